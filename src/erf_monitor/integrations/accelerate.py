"""Hugging Face Accelerate: log ERF probes to ``accelerator.trackers``.

The monitor itself is :func:`~erf_monitor.watch` on the ``accelerator.prepare``'d model and
optimizer (see the Accelerate guide); ``watch(..., logger=accelerator)`` wraps the
accelerator in :class:`AccelerateSink` (a sink like the others, in :mod:`erf_monitor.sinks`),
which sends ERF data through the trackers that ``Accelerator(log_with=...)`` /
``init_trackers`` created: the same W&B and MLflow runs as ``accelerator.log``; for
TensorBoard a run of the monitor's own, ``<the tracker's log dir>/erf``, beside it.
"""

from erf_monitor.sinks import AccelerateSink, is_accelerator

__all__ = ["AccelerateSink", "is_accelerator"]
