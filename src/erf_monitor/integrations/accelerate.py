"""Hugging Face Accelerate: log ERF probes to ``accelerator.trackers``.

The monitor itself is :func:`~erf_monitor.watch` on the ``accelerator.prepare``'d model and
optimizer (see the Accelerate guide); ``watch(..., logger=accelerator)`` wraps the
accelerator in :class:`AccelerateSink` (a sink like the others, in :mod:`erf_monitor.sinks`),
which sends ERF data through the trackers that ``Accelerator(log_with=...)`` /
``init_trackers`` created, so ERF curves land in the same runs as ``accelerator.log``.
"""

from erf_monitor.sinks._accelerate import AccelerateSink, is_accelerator

__all__ = ["AccelerateSink", "is_accelerator"]
