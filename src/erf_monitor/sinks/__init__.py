"""Logging backends for ERF probes, behind one small interface (:class:`Sink`).

Keys are the same on every backend: ``erf/<layer>/<metric>`` for scalars (the metrics of
``ERFResult.scalars()`` that ``metrics=`` selects: :data:`DEFAULT_METRICS` unless asked),
``erf/<layer>/heatmap`` for images; ``step`` is the training step. Raw maps are
``.npz`` files in an ``erf_maps/`` folder wherever a backend keeps files.
Units other than the centre (``position=``) add their key: ``erf/<layer>/<position>/<metric>``;
a set of positions adds the field figure ``erf/<layer>/field``.
Optional backends (TensorBoard, W&B, MLflow) are imported only when a sink is constructed.

Examples:
    >>> import tempfile
    >>> from erf_monitor.sinks import as_sink
    >>> sink = as_sink(tempfile.mkdtemp())   # a directory -> FileSink
    >>> sink.log_scalars({"erf/layer4/coverage": 0.12}, step=100)
"""

from erf_monitor.sinks._accelerate import AccelerateSink, is_accelerator
from erf_monitor.sinks._base import Sink
from erf_monitor.sinks._callable import CallableSink
from erf_monitor.sinks._factory import CSV_SUBDIR, as_sink, sink_for_logger, sinks_for_trainer
from erf_monitor.sinks._file import FileSink, arrays_relpath, safe_filename, save_npz
from erf_monitor.sinks._lightning import LoggerSink
from erf_monitor.sinks._metrics import (
    DEFAULT_METRICS,
    METRIC_NAMES,
    MetricSelection,
    check_metrics,
    metric_patterns,
    pick_metrics,
)
from erf_monitor.sinks._mlflow import MLflowSink
from erf_monitor.sinks._multi import MultiSink, log_results
from erf_monitor.sinks._tensorboard import TB_SUBDIR, TensorBoardSink, key_from_tag
from erf_monitor.sinks._wandb import WandbSink

__all__ = [
    "CSV_SUBDIR",
    "DEFAULT_METRICS",
    "METRIC_NAMES",
    "TB_SUBDIR",
    "AccelerateSink",
    "CallableSink",
    "FileSink",
    "LoggerSink",
    "MLflowSink",
    "MetricSelection",
    "MultiSink",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "arrays_relpath",
    "as_sink",
    "check_metrics",
    "is_accelerator",
    "key_from_tag",
    "log_results",
    "metric_patterns",
    "pick_metrics",
    "safe_filename",
    "save_npz",
    "sink_for_logger",
    "sinks_for_trainer",
]
