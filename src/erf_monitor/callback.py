"""Kept for imports written before the integrations moved: ``ERFMonitor`` lives in
:mod:`erf_monitor.integrations.lightning` (and is ``erf_monitor.ERFMonitor``)."""

from erf_monitor.integrations.lightning import ERFMonitor

__all__ = ["ERFMonitor"]
