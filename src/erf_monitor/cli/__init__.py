"""The ``erf-monitor`` command line (``demo``, ``analyze``, ``report``, ``compare``) and the
offline tools behind it."""

from erf_monitor.cli.main import main

__all__ = ["main"]
