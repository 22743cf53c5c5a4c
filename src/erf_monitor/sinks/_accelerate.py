"""Hugging Face Accelerate: log ERF probes to ``accelerator.trackers``.

The monitor itself is :func:`~erf_monitor.watch` on the ``accelerator.prepare``'d model and
optimizer (see the Accelerate guide); this module adds :class:`AccelerateSink`, which sends
its data through the trackers that ``Accelerator(log_with=...)`` / ``init_trackers`` created,
so ERF curves land next to what ``accelerator.log`` writes (the same W&B and MLflow runs;
for TensorBoard a run of the monitor's own, ``<the tracker's log dir>/erf``).
``watch(..., logger=accelerator)`` wraps the accelerator in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from erf_monitor.sinks._base import Sink
from erf_monitor.sinks._mlflow import MLflowSink
from erf_monitor.sinks._tensorboard import TensorBoardSink
from erf_monitor.sinks._wandb import WandbSink

__all__ = ["AccelerateSink", "is_accelerator"]


def is_accelerator(obj: Any) -> bool:
    """Whether ``obj`` is an ``accelerate.Accelerator`` (checked without importing accelerate)."""
    return any(
        c.__name__ == "Accelerator" and c.__module__.startswith("accelerate")
        for c in type(obj).__mro__
    )


class _TrackerSink(Sink):
    """Any other tracker, through its generic API: ``log`` (scalars) and ``log_images``."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        self.tracker.log({k: float(v) for k, v in scalars.items()}, step=int(step))

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        log_images = getattr(self.tracker, "log_images", None)
        if callable(log_images):
            log_images({key: [image]}, step=int(step))


class AccelerateSink(Sink):
    """Log to every tracker of an ``accelerate.Accelerator``, on the main process only.

    Each tracker's own run is found, so ERF data lands next to what ``accelerator.log``
    writes:

    * ``TensorBoardTracker``: :class:`~erf_monitor.sinks.TensorBoardSink` on its
      ``SummaryWriter``'s log directory: an event file of the monitor's own in
      ``<log dir>/erf`` (scalars, heatmap images, texts; ``.npz`` maps in ``erf_maps/``), the
      writer itself never written to;
    * ``WandBTracker``: :class:`~erf_monitor.sinks.WandbSink` on its run;
    * ``MLflowTracker``: :class:`~erf_monitor.sinks.MLflowSink` on its active run;
    * any other tracker: scalars through ``tracker.log`` and images through
      ``tracker.log_images`` when it has one.

    Trackers are looked up at every call (``init_trackers`` may come after the sink is
    made). On processes other than the main one every call does nothing. Closing the sink
    flushes; the trackers are the accelerator's (``accelerator.end_training()`` ends them).

    Args:
        accelerator: the ``accelerate.Accelerator``.
    """

    def __init__(self, accelerator: Any) -> None:
        if not is_accelerator(accelerator):
            raise TypeError(
                f"AccelerateSink needs an Accelerator, got {type(accelerator).__name__}"
            )
        self.accelerator = accelerator
        self._sinks: dict[int, tuple[Any, Sink]] = {}

    def __repr__(self) -> str:
        names = [type(t).__name__ for t in getattr(self.accelerator, "trackers", [])]
        return f"AccelerateSink({', '.join(names) or 'no trackers'})"

    def _sink(self, tracker: Any) -> Sink:
        cached = self._sinks.get(id(tracker))
        if cached is not None and cached[0] is tracker:
            return cached[1]
        kind = type(tracker).__name__
        sink: Sink
        if kind == "TensorBoardTracker":
            sink = TensorBoardSink(tracker.writer)
        elif kind == "WandBTracker":
            sink = WandbSink(tracker.run)
        elif kind == "MLflowTracker":
            import mlflow

            client = mlflow.MlflowClient(tracking_uri=mlflow.get_tracking_uri())
            sink = MLflowSink(client, tracker.active_run.info.run_id)
        else:
            sink = _TrackerSink(tracker)
        self._sinks[id(tracker)] = (tracker, sink)
        return sink

    def _each(self) -> list[Sink]:
        if not self.accelerator.is_main_process:
            return []
        return [self._sink(t) for t in self.accelerator.trackers]

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """To every tracker."""
        for sink in self._each():
            sink.log_scalars(scalars, step)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """To every tracker that takes images."""
        for sink in self._each():
            sink.log_image(key, image, step)

    def log_text(self, key: str, text: str, step: int) -> None:
        """To every tracker that takes texts (TensorBoard, W&B, MLflow)."""
        for sink in self._each():
            sink.log_text(key, text, step)

    def log_arrays(self, key: str, arrays: Mapping[str, np.ndarray], step: int) -> None:
        """Raw maps where the tracker keeps files (TensorBoard, W&B, MLflow)."""
        for sink in self._each():
            sink.log_arrays(key, arrays, step)

    def alert(self, title: str, text: str, step: int) -> None:
        """W&B alerts; texts elsewhere."""
        for sink in self._each():
            sink.alert(title, text, step)

    def flush(self) -> None:
        """Flush every tracker's writer."""
        for sink in self._each():
            sink.flush()

    def close(self) -> None:
        """Flush only: the trackers belong to the accelerator."""
        self.flush()
