"""Pictures of ERF maps: colormapped heatmaps with their boxes, matplotlib figures. Works on
anything shaped like a result (see :class:`~erf_monitor.viz.render.MapResult`)."""
