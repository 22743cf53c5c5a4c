"""Lightning loggers through their own API: ``log_metrics`` (and ``log_image``, ``save``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from erf_monitor.sinks._base import Sink
from erf_monitor.sinks._file import FileSink

__all__ = ["LoggerSink"]


class LoggerSink(Sink):
    """Log through a Lightning logger's own methods, as Lightning's monitors do.

    * scalars: ``logger.log_metrics(scalars, step=step)``, so they land where the logger puts
      every metric (a ``CSVLogger``'s ``metrics.csv``, one column per key);
    * images: ``logger.log_image(key=key, images=[image], step=step)`` when the logger has a
      ``log_image`` (``WandbLogger``'s signature), else to ``files``;
    * raw maps, texts and alerts: to ``files`` (``None``: dropped);
    * flush: ``logger.save()``, so that a ``CSVLogger`` writes its file after every probe.

    Args:
        logger: a Lightning logger (``lightning.pytorch`` or ``lightning.fabric``).
        files: a :class:`FileSink` for what the logger cannot take, or ``None``.
    """

    def __init__(self, logger: Any, files: FileSink | None = None) -> None:
        if not callable(getattr(logger, "log_metrics", None)):
            raise TypeError(f"LoggerSink needs a logger with log_metrics, got {type(logger)}")
        self.logger = logger
        self.files = files

    def __repr__(self) -> str:
        where = f", files={str(self.files.directory)!r}" if self.files is not None else ""
        return f"LoggerSink({type(self.logger).__name__}{where})"

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """``logger.log_metrics``."""
        self.logger.log_metrics({k: float(v) for k, v in scalars.items()}, step=int(step))

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """``logger.log_image`` if it has one, else a PNG file."""
        log_image = getattr(self.logger, "log_image", None)
        if callable(log_image):
            log_image(key=key, images=[image], step=int(step))
        elif self.files is not None:
            self.files.log_image(key, image, step)

    def log_text(self, key: str, text: str, step: int) -> None:
        """To the files' ``events.log``."""
        if self.files is not None:
            self.files.log_text(key, text, step)

    def log_arrays(self, key: str, arrays: Mapping[str, np.ndarray], step: int) -> None:
        """To the files' ``erf_maps/``."""
        if self.files is not None:
            self.files.log_arrays(key, arrays, step)

    def alert(self, title: str, text: str, step: int) -> None:
        """To the files' ``alerts.jsonl``."""
        if self.files is not None:
            self.files.alert(title, text, step)

    def flush(self) -> None:
        """``logger.save()`` (writes a ``CSVLogger``'s ``metrics.csv``)."""
        save = getattr(self.logger, "save", None)
        if callable(save):
            save()
