"""How results show themselves in Jupyter: ``_repr_html_`` and ``_repr_png_`` of
:class:`~erf_monitor.ERFResult`, :class:`~erf_monitor.ERFResults` and
:class:`~erf_monitor.ERFField`.

A result shows its annotated heatmap (the picture loggers get) next to a table of its metrics;
a collection shows every layer's heatmap and one table with a row per layer (the
RepLKNet-style area ratios a(t) included); a field shows the field figure and a row per
position. Only cheap metrics are shown (no Gaussian fit), so displaying a result costs about
as much as rendering its picture.
"""

from __future__ import annotations

import math
from collections.abc import ItemsView, Iterable, Mapping, Sequence, ValuesView
from typing import TYPE_CHECKING, Any, Protocol

from erf_monitor.viz.notebook import figure_png, image_tag, png_bytes, table_html
from erf_monitor.viz.shapes import MapResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# What is shown, as protocols (the result types import this module to display themselves).
class ERFResult(MapResult, Protocol):
    """:class:`~erf_monitor.ERFResult` as the display reads it."""

    @property
    def num_samples(self) -> int: ...
    @property
    def position(self) -> str: ...
    @property
    def sigma(self) -> tuple[float, ...]: ...
    @property
    def gaussian_r2(self) -> float: ...
    @property
    def coverage_trf(self) -> float: ...
    def area_ratio(self, t: float) -> float: ...


class ERFResults(Protocol):
    """:class:`~erf_monitor.ERFResults` as the display reads it."""

    def __len__(self) -> int: ...
    def items(self) -> ItemsView[str, ERFResult]: ...
    def values(self) -> ValuesView[ERFResult]: ...
    def flat(self) -> Mapping[str, ERFResult]: ...


class ERFField(Protocol):
    """:class:`~erf_monitor.ERFField` as the display reads it."""

    @property
    def centre(self) -> ERFResult: ...
    @property
    def border_ratio(self) -> float: ...
    def items(self) -> ItemsView[str, ERFResult]: ...
    def figure(self, **kwargs: Any) -> Figure: ...


__all__ = ["field_html", "field_png", "result_html", "result_png", "results_html"]

#: Mass fractions of the area ratios shown (RepLKNet Table 10's thresholds).
SHOWN_THRESHOLDS: tuple[float, ...] = (0.2, 0.3, 0.5, 0.99)


def _num(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else "n/a"


def _pct(value: float) -> str:
    return _num(100.0 * value, ".2f") + "%" if math.isfinite(value) else "n/a"


def _trf(r: ERFResult) -> str:
    return "unknown" if r.trf is None else r.trf.short_text("×")


def _shape(shape: Iterable[int]) -> str:
    return "×".join(str(int(s)) for s in shape) or "-"


def _name(r: ERFResult) -> str:
    return r.name or "<model>"


def _metric_rows(r: ERFResult) -> list[tuple[str, str]]:
    rows = [("layer", _name(r))]
    if r.position != "centre":
        rows.append(("position", f"{r.position} (unit {_shape(r.output_index)})"))
    rows += [
        ("mode", r.mode),
        ("probe images", str(r.num_samples)),
        ("input / output grid", f"{_shape(r.heatmap.shape)} / {_shape(r.output_shape)}"),
        ("TRF (clipped, px)", _trf(r)),
        ("ERF size m(0.95) (px)", str(r.erf_size)),
        ("ERF/TRF", _num(r.ratio, ".3f")),
        ("coverage a(0.95)", _pct(r.coverage)),
    ]
    rows += [(f"a({t:.2f})", _pct(r.area_ratio(t))) for t in SHOWN_THRESHOLDS]
    rows += [
        ("sigma (px)", ", ".join(_num(s, ".2f") for s in r.sigma)),
        ("centroid offset (px)", ", ".join(_num(o, "+.2f") for o in r.centroid_offset)),
        ("Gaussian R²", _num(r.gaussian_r2, ".3f")),
    ]
    return rows


def _picture(r: ERFResult, min_size: int = 256) -> bytes:
    """The annotated heatmap (1-D: a curve, 3-D: max-projections) as PNG."""
    from erf_monitor.viz.render import render_heatmap

    return png_bytes(render_heatmap(r, min_size=min_size))


def result_png(r: ERFResult) -> bytes:
    """:class:`ERFResult`'s ``_repr_png_``: its annotated heatmap."""
    return _picture(r)


def result_html(r: ERFResult) -> str:
    """:class:`ERFResult`'s ``_repr_html_``: the annotated heatmap beside its metrics."""
    image = image_tag(_picture(r), f"ERF of {_name(r)}")
    table = table_html(None, _metric_rows(r))
    return (
        '<div style="display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start">'
        f"<div>{image}</div><div>{table}</div></div>"
    )


def _summary_row(path: str, r: ERFResult) -> list[str]:
    return [
        path or "<model>",
        _shape(r.output_shape),
        _trf(r),
        str(r.erf_size),
        _num(r.ratio, ".3f"),
        _pct(r.coverage),
        *[_pct(r.area_ratio(t)) for t in SHOWN_THRESHOLDS],
        ", ".join(_num(s, ".1f") for s in r.sigma),
    ]


_SUMMARY_HEADER = [
    "layer",
    "output",
    "TRF (px)",
    "ERF (px)",
    "ERF/TRF",
    "coverage",
    *[f"a({round(t * 100)}%)" for t in SHOWN_THRESHOLDS],
    "sigma (px)",
]


def results_html(results: ERFResults, thumbnail: int = 200) -> str:
    """:class:`ERFResults`' ``_repr_html_``: every layer's heatmap in a row, then one table
    with a row per layer (and per position of a field)."""
    images = [
        image_tag(_picture(r, min_size=thumbnail), f"ERF of {name or '<model>'}")
        for name, r in results.items()
    ]
    first = next(iter(results.values()), None)
    caption = None
    if first is not None:
        caption = (
            f"ERF of {len(results)} layer(s), mode {first.mode}, {first.num_samples} probe "
            f"image(s) of {_shape(first.heatmap.shape)} px"
        )
    rows = [_summary_row(path, r) for path, r in results.flat().items()]
    return (
        '<div><div style="display:flex;flex-wrap:wrap;gap:8px">'
        + "".join(f"<div>{img}</div>" for img in images)
        + "</div>"
        + table_html(_SUMMARY_HEADER, rows, caption=caption)
        + "</div>"
    )


def _field_rows(field: ERFField) -> list[Sequence[str]]:
    rows: list[Sequence[str]] = []
    for key, x in field.items():
        rows.append(
            [
                key,
                _shape(x.output_index),
                str(x.erf_size),
                _num(x.visible_size, ".1f"),
                _pct(x.coverage),
                _pct(x.coverage_trf),
                ", ".join(_num(o, "+.1f") for o in x.centroid_offset),
            ]
        )
    return rows


def field_png(field: ERFField) -> bytes | None:
    """:class:`ERFField`'s ``_repr_png_``: the field figure (2-D maps), else ``None``."""
    if field.centre.heatmap.dim() != 2:
        return None
    return figure_png(field.figure())


def field_html(field: ERFField) -> str:
    """:class:`ERFField`'s ``_repr_html_``: the field figure and a row per position."""
    png = field_png(field)
    image = image_tag(png, f"ERF field of {_name(field.centre)}") if png is not None else ""
    header = ["position", "unit", "ERF (px)", "visible (px)", "coverage", "of TRF", "offset"]
    ratio = field.border_ratio
    caption = f"ERF field of {_name(field.centre)}: border ratio {_num(ratio, '.2f')}"
    table = table_html(header, _field_rows(field), caption=caption)
    return f"<div>{image}{table}</div>"
