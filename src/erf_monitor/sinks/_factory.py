"""Build sinks from what users have: Lightning loggers, writers, runs, directories, functions."""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

from erf_monitor.core.imports import (
    LIGHTNING_AVAILABLE,
    PL_AVAILABLE,
)
from erf_monitor.core.warn import warn
from erf_monitor.sinks._base import Sink
from erf_monitor.sinks._callable import CallableSink
from erf_monitor.sinks._file import FileSink
from erf_monitor.sinks._lightning import LoggerSink
from erf_monitor.sinks._mlflow import MLflowSink
from erf_monitor.sinks._multi import MultiSink
from erf_monitor.sinks._tensorboard import TensorBoardSink
from erf_monitor.sinks._wandb import WandbSink

__all__ = ["CSV_SUBDIR", "as_sink", "sink_for_logger", "sinks_for_trainer"]

#: Sub-directory of a ``CSVLogger``'s ``log_dir`` for the monitor's heatmaps, raw maps and
#: alerts (its scalars go to the logger's own ``metrics.csv``).
CSV_SUBDIR = "erf"

# Packages whose logger classes we know. Matching walks the class's MRO by name and module,
# so nothing is imported here and user subclasses of the Lightning loggers are recognised.
_LIGHTNING_PACKAGES = (
    "lightning.pytorch",
    "lightning.fabric",
    "pytorch_lightning",
    "lightning_fabric",
)
_KNOWN_LOGGERS = ("TensorBoardLogger", "CSVLogger", "WandbLogger", "MLFlowLogger")


def _lightning_logger_kind(obj: Any) -> str | None:
    """Name of the Lightning logger class ``obj`` is an instance of, or ``None``."""
    if not (LIGHTNING_AVAILABLE or PL_AVAILABLE):
        return None
    for cls in type(obj).__mro__:
        if cls.__module__.startswith(_LIGHTNING_PACKAGES) and cls.__name__ in _KNOWN_LOGGERS:
            return cls.__name__
    if any(c.__module__.startswith(_LIGHTNING_PACKAGES) for c in type(obj).__mro__[:-1]):
        return type(obj).__name__
    return None


def sink_for_logger(logger: Any) -> Sink | None:
    """The sink for one Lightning logger (``lightning.pytorch``, ``lightning.fabric`` or
    ``pytorch_lightning``).

    * ``TensorBoardLogger`` → :class:`TensorBoardSink` writing its own event file in
      ``<logger.log_dir>/erf`` (never into Lightning's ``SummaryWriter``: a failing disk
      must not break the logger's own writes)
    * ``WandbLogger`` → :class:`WandbSink` on ``logger.experiment`` (the run); its records
      carry no ``trainer/global_step`` of their own: a probe at step ``k`` is logged before
      Lightning's record of batch ``k - 1``, so stamping ``k`` made that axis go back
    * ``CSVLogger`` → :class:`~erf_monitor.sinks.LoggerSink`: scalars through
      ``logger.log_metrics`` (columns of its ``<log_dir>/metrics.csv``), heatmaps, raw maps
      and alerts as files in ``<log_dir>/erf/`` (``heatmaps/``, ``erf_maps/``, ``alerts.jsonl``)
    * ``MLFlowLogger`` → :class:`MLflowSink` on ``(logger.experiment, logger.run_id)``
    * any other logger with a ``log_metrics`` (a custom ``Logger`` subclass, Comet,
      Neptune...) → :class:`~erf_monitor.sinks.LoggerSink`: scalars through its
      ``log_metrics``, images through its ``log_image`` if it has one

    Accessing ``logger.experiment`` creates the run/writer, as Lightning itself does at fit.

    Args:
        logger: a Lightning logger.

    Returns:
        The sink, or ``None`` for an object that is not a Lightning logger with
        ``log_metrics``.
    """
    kind = _lightning_logger_kind(logger)
    if kind == "TensorBoardLogger":
        return TensorBoardSink(logger.experiment)
    if kind == "WandbLogger":
        return WandbSink(logger.experiment)
    if kind == "CSVLogger":
        _ = logger.experiment  # created first: it warns about a non-empty log_dir otherwise
        return LoggerSink(logger, FileSink(Path(logger.log_dir) / CSV_SUBDIR))
    if kind == "MLFlowLogger":
        return MLflowSink(logger.experiment, logger.run_id)
    if (
        kind is not None
        and kind != "DummyLogger"
        and callable(getattr(logger, "log_metrics", None))
    ):
        return LoggerSink(logger)
    return None


def sinks_for_trainer(trainer: Any, *, rank_zero_only: bool = True) -> list[Sink]:
    """One sink per logger of a Lightning ``Trainer`` (see :func:`sink_for_logger`).

    Objects that are not loggers erf-monitor can write to are skipped with one warning
    naming them.

    Args:
        trainer: a ``lightning.pytorch.Trainer`` or ``pytorch_lightning.Trainer``.
        rank_zero_only: return no sinks on processes other than global rank 0 (Lightning's
            loggers only write from rank 0 too).

    Returns:
        The sinks, in the order of ``trainer.loggers``.
    """
    if rank_zero_only and int(getattr(trainer, "global_rank", 0)) != 0:
        return []
    loggers = list(getattr(trainer, "loggers", None) or [])
    sinks: list[Sink] = []
    skipped: list[str] = []
    for logger in loggers:
        sink = sink_for_logger(logger)
        if sink is None and type(logger).__name__ == "DummyLogger":
            continue  # what fast_dev_run installs: there is nothing to log to
        if sink is None:
            skipped.append(type(logger).__name__)
        else:
            sinks.append(sink)
    if skipped:
        warn(
            f"erf-monitor: no sink for logger(s) {', '.join(skipped)}; ERF data is not sent "
            "to them.\nSupported: Lightning loggers with log_metrics (TensorBoard, W&B, CSV and "
            "MLflow get images and maps too), or pass ERFMonitor(sinks=...).",
            UserWarning,
        )
    return sinks


def _is_wandb_run(obj: Any) -> bool:
    return any(c.__module__.startswith("wandb") for c in type(obj).__mro__[:-1]) and hasattr(
        obj, "log"
    )


def as_sink(obj: Any) -> Sink:
    """Turn what a plain-PyTorch user passes as ``logger=`` into a :class:`Sink`.

    Accepted, in this order:

    * a :class:`Sink` → itself
    * a list or tuple of any of these → :class:`MultiSink`
    * a Lightning logger → :func:`sink_for_logger`
    * a ``SummaryWriter`` (anything with ``add_scalar`` and ``add_image``) →
      :class:`TensorBoardSink` writing to ``<its log_dir>/erf`` (the writer stays yours: never
      written to or closed)
    * a ``wandb`` run → :class:`WandbSink`
    * a ``str`` or ``os.PathLike`` directory → :class:`FileSink`
    * an ``accelerate.Accelerator`` → :class:`~erf_monitor.sinks.AccelerateSink`
      (its trackers)
    * a callable ``fn(step, scalars, images)`` → :class:`CallableSink`

    Args:
        obj: the object to wrap.

    Returns:
        A sink.

    Raises:
        TypeError: for anything else, listing the accepted kinds.

    Examples:
        >>> import tempfile
        >>> as_sink(tempfile.mkdtemp()).__class__.__name__
        'FileSink'
        >>> as_sink(lambda step, scalars, images: None).__class__.__name__
        'CallableSink'
    """
    if isinstance(obj, Sink):
        return obj
    if isinstance(obj, (list, tuple)):
        return MultiSink([as_sink(o) for o in obj])
    kind = _lightning_logger_kind(obj)
    if kind is not None:
        sink = sink_for_logger(obj)
        if sink is None:
            raise TypeError(f"erf-monitor has no sink for the Lightning logger {kind}")
        return sink
    if hasattr(obj, "add_scalar") and hasattr(obj, "add_image"):
        return TensorBoardSink(obj)
    if _is_wandb_run(obj):
        return WandbSink(obj)
    if isinstance(obj, (str, PathLike)):
        return FileSink(obj)
    from erf_monitor.sinks._accelerate import AccelerateSink, is_accelerator

    if is_accelerator(obj):
        return AccelerateSink(obj)
    if callable(obj):
        return CallableSink(obj)
    raise TypeError(
        f"Cannot log ERF data to a {type(obj).__module__}.{type(obj).__qualname__}. Pass a "
        "torch.utils.tensorboard.SummaryWriter, a wandb run, a directory (str or Path) for "
        "CSV/PNG/npz files, a function fn(step, scalars, images), a Lightning logger, an "
        "accelerate.Accelerator, an erf_monitor.sinks.Sink, or a list of these."
    )
