"""Thin front-ends over the framework-free core, one module per training framework.

* :mod:`erf_monitor.integrations.lightning`: ``ERFMonitor``, a Lightning ``Callback``.

Each is imported only when used (``erf_monitor.ERFMonitor`` is resolved lazily), so the
frameworks stay optional. All of them share :class:`~erf_monitor.MonitorOptions` and the
:class:`~erf_monitor._monitor.MonitorEngine` that does the work.
"""
