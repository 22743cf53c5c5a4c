"""Thin front-ends over the framework-free core, one module per training framework.

* :mod:`erf_monitor.integrations.lightning`: ``ERFMonitor``, a Lightning ``Callback``.
* :mod:`erf_monitor.integrations.transformers`: ``ERFTrainerCallback``, a Hugging Face
  ``TrainerCallback``.
* :mod:`erf_monitor.integrations.accelerate`: ``AccelerateSink``, logging to
  ``accelerator.trackers`` (the monitor itself is :func:`~erf_monitor.watch`, which also
  serves Lightning Fabric loops).

Each is imported only when used (``erf_monitor.ERFMonitor`` and
``erf_monitor.ERFTrainerCallback`` are resolved lazily), so the frameworks stay optional. All
of them share :class:`~erf_monitor.MonitorOptions` and the
:class:`~erf_monitor.monitor.engine.MonitorEngine` that does the work; when every rank must probe
(sharded models), :mod:`erf_monitor.probe.distributed` runs the probe on all of them.
"""
