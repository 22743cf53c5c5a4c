"""Fan-out to several sinks, isolating failures, and the one function that logs a probe."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from erf_monitor.core.errors import ERFProbeWarning
from erf_monitor.core.warn import warn
from erf_monitor.sinks._base import Sink
from erf_monitor.sinks._metrics import MetricSelection, metric_patterns, pick_metrics

if TYPE_CHECKING:
    from erf_monitor.measure.result import ERFResult

__all__ = ["MultiSink", "log_results"]


class MultiSink(Sink):
    """Send every call to several sinks; a failing sink never stops the others.

    When a sink raises, one ``UserWarning`` names the sink, the call and the error; the
    same kind of error from the same sink and call is not repeated (training loops call
    sinks many times), and the remaining sinks still get their data.

    Args:
        sinks: the sinks to fan out to (nested ``MultiSink`` objects are fine).
    """

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks: list[Sink] = list(sinks)
        self._reported: set[tuple[int, str, str]] = set()

    def __repr__(self) -> str:
        return f"MultiSink({self.sinks!r})"

    def _each(self, method: str, call: Callable[[Sink], Any]) -> None:
        for i, sink in enumerate(self.sinks):
            try:
                call(sink)
            except Exception as err:
                tag = (i, method, type(err).__name__)
                if tag in self._reported:
                    continue
                self._reported.add(tag)
                warn(
                    f"erf-monitor: {sink!r}.{method} failed with {type(err).__name__}: {err}.\n"
                    "That data is lost; the other sinks and training continue (reported once).",
                    UserWarning,
                    failure=True,
                )

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Forward to every sink."""
        self._each("log_scalars", lambda s: s.log_scalars(scalars, step))

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """Forward to every sink."""
        self._each("log_image", lambda s: s.log_image(key, image, step))

    def log_text(self, key: str, text: str, step: int) -> None:
        """Forward to every sink."""
        self._each("log_text", lambda s: s.log_text(key, text, step))

    def log_arrays(self, key: str, arrays: Mapping[str, np.ndarray], step: int) -> None:
        """Forward to every sink."""
        self._each("log_arrays", lambda s: s.log_arrays(key, arrays, step))

    def alert(self, title: str, text: str, step: int) -> None:
        """Forward to every sink."""
        self._each("alert", lambda s: s.alert(title, text, step))

    def flush(self) -> None:
        """Forward to every sink."""
        self._each("flush", lambda s: s.flush())

    def close(self) -> None:
        """Forward to every sink."""
        self._each("close", lambda s: s.close())


def _items(results: Mapping[str, ERFResult] | Iterable[ERFResult]) -> list[tuple[str, ERFResult]]:
    if isinstance(results, Mapping):
        return list(results.items())
    return [(r.name, r) for r in results]


def _path(name: str, r: ERFResult) -> str:
    """``<layer>`` for the centre unit, ``<layer>/<position>`` for any other."""
    position = getattr(r, "position", "centre")
    return name if position == "centre" else f"{name}/{position}"


def _flat(items: list[tuple[str, ERFResult]]) -> list[tuple[str, ERFResult]]:
    """Every result by its key path, each position of a field included."""
    out = []
    for name, r in items:
        field = getattr(r, "field", None)
        for x in field.values() if field is not None else (r,):
            out.append((_path(name, x), x))
    return out


def log_results(
    sinks: Sink | Sequence[Sink],
    results: Mapping[str, ERFResult] | Iterable[ERFResult],
    step: int,
    *,
    prefix: str = "erf",
    render_kwargs: Mapping[str, Any] | None = None,
    images: bool = True,
    arrays: bool = True,
    mode_text: bool = True,
    metrics: MetricSelection = None,
    extra: Mapping[str, float] | None = None,
    flush: bool = True,
    values: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, float]:
    """Log one probe's results to every sink, never raising because of a sink.

    Sends, in this order and to every sink:

    1. scalars ``<prefix>/<layer>/<metric>`` for each ``metric`` of ``result.scalars()``
       that ``metrics`` selects (see :func:`~erf_monitor.sinks._metrics.pick_metrics`), and
       ``extra``, in one ``log_scalars`` call; a result at another unit than the centre (see
       ``docs/guides/positions.md``) under ``<prefix>/<layer>/<position>/<metric>``, and
       every position of a layer's field likewise;
    2. with ``mode_text``, the mode and its exact definition as text, ``<prefix>/mode``
       (``"mode=luo: ..."``, see :mod:`erf_monitor.core.modes`; monitors send it with their first
       probe only);
    3. one image per layer, ``<prefix>/<layer>/heatmap`` (``<prefix>/<layer>/<position>/
       heatmap`` for a single non-centre position), rendered once with
       :func:`~erf_monitor.viz.render.render_heatmap` (``render_kwargs`` passed on), and for a
       layer with a field (2-D) its figure, ``<prefix>/<layer>/field``;
    4. the raw maps in one ``log_arrays(prefix, {layer: heatmap})`` call (float32 arrays;
       other positions as ``<layer>/<position>``), plus the entries ``__mode__`` and
       ``__definition__`` (0-d string arrays);

    then flushes (unless ``flush`` is false: a monitor adds its alerts to the same probe
    first, so that a sink that sends one record per flush, W&B's, sends one per probe). A
    sink that raises gets one warning (see :class:`MultiSink`); a layer whose map cannot be
    rendered is warned about and skipped for images only.

    Args:
        sinks: one sink or several.
        results: ``compute_erf``'s mapping ``layer -> ERFResult`` or a sequence of results.
        step: training step (``trainer.global_step`` or the watcher's count).
        prefix: top-level key namespace.
        render_kwargs: keyword arguments for ``render_heatmap`` (``cmap``, ``log_scale``...).
        images: log heatmap images.
        arrays: log raw maps.
        mode_text: log the mode's definition as text.
        metrics: which metrics of each result: ``None`` (the default set), ``"all"`` or
            names (``MonitorOptions.metrics``).
        extra: further scalars logged with the probe's (a monitor's probe time and
            thresholds), keys as given.
        flush: flush the sinks at the end.
        values: the metrics already measured, ``{path: {metric: value}}`` as
            ``ERFResults.scalars()`` returns them (a monitor measures once for its history
            and its sinks); the selected ones must be among them.

    Returns:
        The scalar dict that was logged.
    """
    from erf_monitor.core.modes import describe, metadata
    from erf_monitor.viz.render import render_heatmap

    multi = (
        sinks
        if isinstance(sinks, MultiSink)
        else MultiSink([sinks] if isinstance(sinks, Sink) else sinks)
    )
    items = _items(results)
    scalars: dict[str, float] = {}
    patterns = metric_patterns(metrics)
    for path, r in _flat(items):
        measured = values[path] if values is not None and path in values else None
        if measured is None:
            measured = r.scalars(patterns)  # only what is logged is computed
        for metric, value in pick_metrics(measured, metrics).items():
            scalars[f"{prefix}/{path}/{metric}"] = float(value)
    scalars.update({k: float(v) for k, v in (extra or {}).items()})
    if scalars:
        multi.log_scalars(scalars, step)
    modes = sorted({r.mode for _, r in items})
    for mode in modes if mode_text else ():
        multi.log_text(f"{prefix}/mode", describe(mode), step)
    if images:
        kwargs = dict(render_kwargs or {})
        kwargs.pop("step", None)
        for name, r in items:
            try:
                image = render_heatmap(r, step=step, **kwargs)
            except Exception as err:
                warn(
                    f"erf-monitor: could not render the ERF map of layer {name!r} "
                    f"({type(err).__name__}: {err}); its image is skipped",
                    UserWarning,
                    failure=True,
                )
                continue
            multi.log_image(f"{prefix}/{_path(name, r)}/heatmap", image, step)
            field = getattr(r, "field", None)
            if field is not None and r.heatmap.dim() == 2:
                try:
                    from erf_monitor.viz.field import render_field

                    multi.log_image(f"{prefix}/{name}/field", render_field(field), step)
                except Exception as err:
                    warn(
                        f"erf-monitor: could not draw the ERF field of layer {name!r} "
                        f"({type(err).__name__}: {err}); its image is skipped",
                        ERFProbeWarning,
                        failure=True,
                    )
    if arrays and items:
        maps = {path: r.heatmap.detach().cpu().float().numpy() for path, r in _flat(items)}
        if len(modes) == 1:
            maps.update(metadata(modes[0]))
        multi.log_arrays(prefix, maps, step)
    if flush:
        multi.flush()
    return scalars
