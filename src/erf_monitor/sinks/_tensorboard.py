"""TensorBoard through ``torch.utils.tensorboard.SummaryWriter`` (or any writer like it)."""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from erf_monitor._imports import require
from erf_monitor.sinks._base import Sink

__all__ = ["TensorBoardSink"]


class TensorBoardSink(Sink):
    """Log to TensorBoard.

    Scalars go through ``add_scalar``, heatmaps through ``add_image(..., dataformats="HWC")``,
    texts and alerts through ``add_text``. Raw maps are saved as
    ``<log_dir>/erf_maps/step_<N>.npz`` next to the event files when ``save_arrays`` is true
    and the writer has a log directory (TensorBoard ignores them).

    Args:
        writer_or_logdir: a ``SummaryWriter`` you own (used as is, flushed but never closed
            by the sink) or a directory, on which the sink opens (and closes) its own writer.
        save_arrays: keep raw maps as ``.npz`` files in the writer's log directory.

    Raises:
        ModuleNotFoundError: if a directory is given and ``tensorboard`` is not installed.
    """

    def __init__(self, writer_or_logdir: Any, *, save_arrays: bool = True) -> None:
        if isinstance(writer_or_logdir, (str, PathLike)):
            require("tensorboard", "tensorboard", "TensorBoardSink")
            from torch.utils.tensorboard import SummaryWriter

            self.writer: Any = SummaryWriter(log_dir=str(writer_or_logdir))
            self._owns_writer = True
        elif hasattr(writer_or_logdir, "add_scalar") and hasattr(writer_or_logdir, "add_image"):
            self.writer = writer_or_logdir
            self._owns_writer = False
        else:
            raise TypeError(
                "TensorBoardSink needs a SummaryWriter or a log directory, got "
                f"{type(writer_or_logdir).__name__}"
            )
        self.save_arrays = save_arrays

    def __repr__(self) -> str:
        return f"TensorBoardSink({self.log_dir!s})"

    @property
    def log_dir(self) -> Path | None:
        """The writer's log directory, if it has one."""
        getter = getattr(self.writer, "get_logdir", None)
        d = getter() if callable(getter) else getattr(self.writer, "log_dir", None)
        return Path(d) if isinstance(d, (str, PathLike)) else None

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """``add_scalar`` for every key."""
        for key, value in scalars.items():
            self.writer.add_scalar(key, float(value), global_step=int(step))

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """``add_image`` with ``dataformats="HWC"`` (uint8 RGB)."""
        self.writer.add_image(key, image, global_step=int(step), dataformats="HWC")

    def log_text(self, key: str, text: str, step: int) -> None:
        """``add_text``."""
        self.writer.add_text(key, text, global_step=int(step))

    def log_arrays(self, key: str, arrays: Mapping[str, np.ndarray], step: int) -> None:
        """Save ``<log_dir>/erf_maps/step_<N>.npz`` (format: :func:`save_npz`)."""
        if not self.save_arrays or self.log_dir is None:
            return
        from erf_monitor.sinks._file import arrays_relpath, save_npz

        save_npz(self.log_dir / "erf_maps" / arrays_relpath(key, step), arrays)

    def flush(self) -> None:
        """Flush the writer's event file."""
        self.writer.flush()

    def close(self) -> None:
        """Close the writer if this sink opened it, else only flush it."""
        if self._owns_writer:
            self.writer.close()
        else:
            self.writer.flush()
