"""erf-monitor: watch the effective receptive field of your vision model while it trains.

The core (``compute_erf``, ``theoretical_rf``, metrics) needs only torch. Integrations that
need optional packages (Lightning's ``ERFMonitor``, Hugging Face's ``ERFTrainerCallback``) are
imported on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from erf_monitor.core.errors import (
    ERFCoverageWarning,
    ERFInputWarning,
    ERFProbeError,
    ERFProbeWarning,
)
from erf_monitor.core.probing import is_probing
from erf_monitor.inputs.images import load_images
from erf_monitor.measure.result import ERFField, ERFResult, ERFResults
from erf_monitor.monitor.options import MonitorOptions
from erf_monitor.monitor.watch import Watcher, watch
from erf_monitor.probe.compute import compute_erf, theoretical_rf
from erf_monitor.targets.tokens import TokenLayout
from erf_monitor.trf.types import TRF
from erf_monitor.viz.grid import grid_figure

if TYPE_CHECKING:
    from erf_monitor.cli.replay import replay
    from erf_monitor.integrations.lightning import ERFMonitor
    from erf_monitor.integrations.transformers import ERFTrainerCallback

__version__ = "0.1.0"

__all__ = [
    "TRF",
    "ERFCoverageWarning",
    "ERFField",
    "ERFInputWarning",
    "ERFMonitor",
    "ERFProbeError",
    "ERFProbeWarning",
    "ERFResult",
    "ERFResults",
    "ERFTrainerCallback",
    "MonitorOptions",
    "TokenLayout",
    "Watcher",
    "__version__",
    "compute_erf",
    "grid_figure",
    "is_probing",
    "load_images",
    "replay",
    "theoretical_rf",
    "watch",
]

_LAZY = {
    "ERFMonitor": "erf_monitor.integrations.lightning",
    "ERFTrainerCallback": "erf_monitor.integrations.transformers",
    "replay": "erf_monitor.cli.replay",
}


def __getattr__(name: str) -> Any:
    # Lightning and transformers are heavy and optional: import a callback only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'erf_monitor' has no attribute {name!r}")
