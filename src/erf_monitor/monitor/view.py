"""The read-only properties every monitoring front-end shows (:class:`EngineView`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from erf_monitor.measure.result import ERFResults
    from erf_monitor.monitor.engine import MonitorEngine

__all__ = ["EngineView"]


class EngineView:
    """Read-only properties shared by :class:`~erf_monitor.ERFMonitor` and ``Watcher``."""

    _engine: MonitorEngine

    @property
    def every_n_steps(self) -> int:
        """Probe period in optimizer steps."""
        return self._engine.every_n_steps

    @property
    def min_coverage(self) -> float | dict[str, float] | None:
        """Alert threshold(s)."""
        return self._engine.min_coverage

    @property
    def layers(self) -> list[str] | None:
        """Resolved layer names (``None`` until the first probe)."""
        return None if self._engine.layer_names is None else list(self._engine.layer_names)

    @property
    def probe_batch(self) -> torch.Tensor | None:
        """The fixed probe batch (CPU), once captured."""
        return self._engine.probe_batch

    @property
    def history(self) -> dict[str, dict[int, dict[str, float]]]:
        """``{layer: {step: {metric: value}}}`` of every probe so far (on rank 0)."""
        return self._engine.history

    @property
    def latest(self) -> ERFResults | None:
        """Results of the latest successful probe (on rank 0)."""
        return self._engine.latest

    @property
    def alerts(self) -> dict[str, int]:
        """Coverage alerts fired so far: ``{layer: step}``, the step of the probe at which each
        layer's alert fired (at most once per layer, kept across checkpoint/resume); empty
        while no alert fired. ``{"layer4": 0}`` means: already below ``min_coverage`` at the
        first probe, before any training step."""
        return dict(self._engine.alerted)
