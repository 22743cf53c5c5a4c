"""Weights & Biases."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from erf_monitor.core.imports import require
from erf_monitor.sinks._base import Sink

__all__ = ["WandbSink"]


class WandbSink(Sink):
    """Log to a W&B run.

    W&B's own ``step`` must increase monotonically and Lightning's ``WandbLogger`` already
    drives it, so this sink never passes ``step=`` to ``run.log``. Instead every record
    carries the probe's step under ``step_key`` (default ``"erf/step"``), declared once with
    ``run.define_metric("erf/*", step_metric="erf/step")`` for every top-level key prefix it
    logs, so the W&B UI plots ERF curves against the training step. The same record also
    carries each key of ``extra_step_keys`` (the Hugging Face callback passes
    ``"train/global_step"``); only for an axis that never goes back: Lightning's
    ``trainer/global_step`` is not stamped, its record of batch ``k - 1`` comes after a probe
    at step ``k``.

    Everything logged for one step is collected and sent in **one** ``run.log`` call when
    the sink is flushed (``log_results`` and the monitors flush once per probe) or when data
    for another step arrives, so each probe is one row of the run's history:

    * scalars: ``{step_key: step, **scalars}``
    * images: ``{key: wandb.Image(image)}``
    * texts (the mode's definition): ``run.summary[key]``, never a table in the history
    * alerts: ``run.alert(title=..., text=..., level=WARN)`` at once, nothing else; only if
      that fails (old servers, a run without alerts) is the alert logged as text
      ``alerts/<title>`` (a table) instead
    * raw maps: ``<run.dir>/erf_maps/step_<N>.npz`` (uploaded with the run's files)

    Args:
        run: a ``wandb`` run; ``None`` uses ``wandb.run`` at the first log call.
        step_key: name of the custom x-axis metric.
        extra_step_keys: further keys set to the step in every record.

    Raises:
        ModuleNotFoundError: if ``wandb`` is not installed.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        step_key: str = "erf/step",
        extra_step_keys: Sequence[str] = (),
    ) -> None:
        require("wandb", "wandb", "WandbSink")
        self._run = run
        self.step_key = step_key
        self.extra_step_keys = tuple(extra_step_keys)
        self._defined: set[str] = set()
        self._tables: dict[str, list[list[Any]]] = {}
        self._step: int | None = None
        self._pending: dict[str, Any] = {}

    def __repr__(self) -> str:
        name = getattr(self._run, "name", None) if self._run is not None else "wandb.run"
        return f"WandbSink({name!r})"

    @property
    def run(self) -> Any:
        """The run logged to (``wandb.run`` if none was given)."""
        if self._run is None:
            import wandb

            if wandb.run is None:
                raise RuntimeError("WandbSink: no active W&B run; call wandb.init() or pass run=")
            self._run = wandb.run
        return self._run

    def _define(self, keys: Sequence[str]) -> None:
        run = self.run
        define = getattr(run, "define_metric", None)
        if define is None:
            return
        if self.step_key not in self._defined:
            define(self.step_key)
            self._defined.add(self.step_key)
        for key in keys:
            head = key.split("/", 1)[0]
            if "/" in key and head not in self._defined:
                define(f"{head}/*", step_metric=self.step_key)
                self._defined.add(head)

    def _log(self, data: dict[str, Any], step: int) -> None:
        if self._step is not None and self._step != int(step):
            self.flush()
        self._step = int(step)
        self._pending.update(data)

    def flush(self) -> None:
        """Send what was collected for the current step as one ``run.log`` record."""
        step, data = self._step, self._pending
        self._step, self._pending = None, {}
        if step is None or not data:
            return
        self._define(list(data))
        record: dict[str, Any] = {self.step_key: step}
        record.update({k: step for k in self.extra_step_keys})
        record.update(data)
        self.run.log(record)

    def close(self) -> None:
        """Send what is pending (the run stays open: it is the user's or the logger's)."""
        self.flush()

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Add the scalars to the step's record."""
        self._log({k: float(v) for k, v in scalars.items()}, step)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """Add ``wandb.Image(image)`` to the step's record."""
        import wandb

        self._log({key: wandb.Image(image, caption=f"step {int(step)}")}, step)

    def log_text(self, key: str, text: str, step: int) -> None:
        """Set ``run.summary[key]`` to the text (the mode's definition...): a table in the
        history would be charted by its row and column counts (``wandb leet``)."""
        self.run.summary[key] = text

    def _log_table(self, key: str, text: str, step: int) -> None:
        """Append a row to the key's ``wandb.Table`` and add the table to the step's record."""
        import wandb

        rows = self._tables.setdefault(key, [])
        rows.append([int(step), text])
        self._log({key: wandb.Table(columns=["step", "text"], data=[list(r) for r in rows])}, step)

    def alert(self, title: str, text: str, step: int) -> None:
        """``run.alert`` at level WARN; the alert is logged as text (with a warning) only when
        ``run.alert`` fails."""
        try:
            self.run.alert(title=title, text=f"[step {int(step)}] {text}", level="WARN")
        except Exception as err:  # no alerts on this run/server: keep the alert as text
            warnings.warn(
                f"WandbSink: run.alert failed ({type(err).__name__}: {err}); "
                f"logging it as text 'alerts/{title}' instead",
                stacklevel=2,
            )
            self._log_table(f"alerts/{title}", text, step)

    def log_arrays(self, key: str, arrays: Mapping[str, np.ndarray], step: int) -> None:
        """Save ``<run.dir>/erf_maps/step_<N>.npz`` (format: :func:`save_npz`)."""
        from erf_monitor.sinks._file import MAPS_DIR, arrays_relpath, save_npz

        run_dir = getattr(self.run, "dir", None)
        if run_dir:
            save_npz(Path(run_dir) / MAPS_DIR / arrays_relpath(key, step), arrays)
