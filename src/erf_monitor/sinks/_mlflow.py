"""MLflow, through an ``mlflow.tracking.MlflowClient`` and a run id."""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from erf_monitor.core.imports import require
from erf_monitor.sinks._base import Sink

__all__ = ["MLflowSink"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")


def _metric_key(key: str) -> str:
    """MLflow keys allow alphanumerics, ``_ - . : /`` and spaces; replace anything else."""
    return _UNSAFE.sub("_", key)


class MLflowSink(Sink):
    """Log to an MLflow run (Lightning's ``MLFlowLogger`` maps here).

    * scalars: ``client.log_batch(run_id, metrics=[Metric(key, value, timestamp, step)])``
    * images: ``client.log_image(run_id, image, key=key, step=step)`` (MLflow >= 2.15, shown
      as a step slider in the UI); older clients get ``artifact_file="<key>/step_<N>.png"``
    * texts/alerts: ``client.log_text(run_id, text, "erf_text/<key>/step_<N>.txt")``
    * raw maps: ``client.log_artifact(run_id, <tmp>/step_<N>.npz, "erf_maps")``

    Keys are kept, except characters MLflow rejects, which become ``_``.

    Args:
        client: an ``mlflow.tracking.MlflowClient`` (``MLFlowLogger.experiment``).
        run_id: the run to log to (``MLFlowLogger.run_id``).

    Raises:
        ModuleNotFoundError: if ``mlflow`` is not installed.
    """

    def __init__(self, client: Any, run_id: str) -> None:
        require("mlflow", None, "MLflowSink")
        self.client = client
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"MLflowSink(run_id={self.run_id!r})"

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """One ``log_batch`` call with all metrics."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_metric_key(k), float(v), now, int(step)) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """``log_image`` with ``key``/``step`` when supported, else as an artifact file."""
        key = _metric_key(key)
        try:
            self.client.log_image(self.run_id, image, key=key, step=int(step))
        except TypeError:  # mlflow < 2.15: no key/step arguments
            self.client.log_image(self.run_id, image, artifact_file=f"{key}/step_{int(step)}.png")

    def log_text(self, key: str, text: str, step: int) -> None:
        """``log_text`` to ``erf_text/<key>/step_<N>.txt``."""
        self.client.log_text(self.run_id, text, f"erf_text/{_metric_key(key)}/step_{int(step)}.txt")

    def log_arrays(self, key: str, arrays: Mapping[str, np.ndarray], step: int) -> None:
        """Upload ``step_<N>.npz`` (format: :func:`save_npz`) under the ``erf_maps`` artifacts."""
        from erf_monitor.sinks._file import MAPS_DIR, arrays_relpath, save_npz

        rel = arrays_relpath(key, step)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_npz(Path(tmp) / rel.name, arrays)
            artifact_path = "/".join((MAPS_DIR, *rel.parent.parts))
            self.client.log_artifact(self.run_id, str(path), artifact_path)
