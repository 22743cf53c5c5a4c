"""The ERF field: one layer's results at a set of positions, and its figure.

:class:`ERFField` is what ``compute_erf(..., position="grid:5")`` puts on each layer's result
(``res[layer].field``): ``{position key: ERFResult}``, the centre unit included.

Its figure (:func:`field_figure`) shows, across the output plane, the ERF size of every unit
(colour) and its centroid offset (arrows, from the unit's theoretical centre), so that the
shrinking of border units' fields and padding-induced shifts are visible at a glance; a
second panel overlays every unit's normalised map on the input plane (truncated fields,
gridding). Matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from erf_monitor._result import ERFResult

__all__ = ["ERFField", "field_figure", "render_field"]


class ERFField(Mapping[str, "ERFResult"]):
    """One layer's ERF results at several positions: ``{position key: ERFResult}``.

    Ordered as requested, the centre unit (key ``"centre"``) first. Several keys may name
    the same output unit (a grid larger than a small output): they share one measurement.

    Attributes:
        grid: ``(k, k)`` for a ``k x k`` grid request, else ``None``.
    """

    def __init__(self, results: Mapping[str, ERFResult], grid: tuple[int, ...] | None = None):
        self._results = dict(results)
        self.grid = grid

    def __getitem__(self, key: str) -> ERFResult:
        try:
            return self._results[key]
        except KeyError:
            raise KeyError(f"No position {key!r}; have {list(self._results)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}: {r.erf_size}" for k, r in self._results.items())
        return f"ERFField({self.centre.name!r}, erf_size {{{sizes}}})"

    @property
    def centre(self) -> ERFResult:
        """The centre unit's result (the layer's result in ``compute_erf``'s mapping)."""
        return self._results["centre"]

    def at(self, index: tuple[int, ...]) -> ERFResult:
        """The result of output unit ``index`` (non-negative, as :attr:`ERFResult.output_index`)."""
        for r in self._results.values():
            if r.output_index == tuple(index):
                return r
        raise KeyError(f"No position at output index {tuple(index)} in this field")

    @property
    def corners(self) -> list[ERFResult]:
        """Results of the output plane's corner units (first or last index on every axis),
        one per unit."""
        grid = self.centre.output_shape
        seen: dict[tuple[int, ...], ERFResult] = {}
        for r in self._results.values():
            idx = r.output_index
            if grid and all(i in (0, s - 1) for i, s in zip(idx, grid)):
                seen.setdefault(idx, r)
        return list(seen.values())

    @property
    def border_ratio(self) -> float:
        """Mean visible ERF size of the corner units over the centre unit's.

        The visible size (:attr:`ERFResult.visible_size`) is the side of the 95%-mass
        square as the image clips it: a corner unit's square is cut by two borders. About
        0.5 in 2-D when a corner unit's ERF reaches as far from it as the centre unit's
        does (a quarter of it is inside the image), 1 when the ERFs are small enough for
        the border not to matter; below 0.5 when the padding also shrinks the corner
        unit's ERF. NaN when the field has no corner unit (e.g. ``"edges"``) or the centre
        unit's map is zero.
        """
        corners = self.corners
        centre = self.centre.visible_size
        if not corners or centre == 0:
            return math.nan
        return float(np.mean([r.visible_size for r in corners])) / centre

    def figure(self, **kwargs: Any) -> Figure:
        """The field figure (:func:`field_figure`)."""
        return field_figure(self, **kwargs)


def _quadrant_cells(values: list[float]) -> np.ndarray:
    """Cell edges around sorted unique centres (midpoints, half a step outside)."""
    v = np.asarray(values, dtype=float)
    if v.size == 1:
        return np.array([v[0] - 0.5, v[0] + 0.5])
    mids = (v[1:] + v[:-1]) / 2
    return np.concatenate([[v[0] - (mids[0] - v[0])], mids, [v[-1] + (v[-1] - mids[-1])]])


def field_figure(
    field: ERFField,
    *,
    title: str | None = None,
    cmap: str = "viridis",
    arrow_scale: float | None = None,
) -> Figure:
    """Two panels for a 2-D field.

    Left: one cell per probed unit, laid out by output row and column (a ``k x k`` grid fills
    the matrix; corners or edges leave cells empty), coloured by the unit's visible ERF size
    (the side of the 95%-mass square as the image clips it, px;
    :attr:`ERFResult.visible_size`, written in the cell), with an arrow for its centroid
    offset (direction as on the image; the axis label gives the scale in pixels). Right:
    every unit's map normalised to its maximum, overlaid on the input plane (max over units),
    with the units' theoretical centres marked.

    Args:
        field: the :class:`ERFField` (2-D maps only).
        title: figure title (default: the layer and the border ratio).
        cmap: colour map of the ERF sizes.
        arrow_scale: arrow length in cells per pixel of offset (default: the longest arrow
            is 0.4 cell).

    Raises:
        ValueError: a field whose maps are not 2-D.
    """
    from matplotlib.figure import Figure

    first = field.centre
    if first.heatmap.dim() != 2:
        raise ValueError(f"the field figure needs 2-D maps, got {first.heatmap.dim()}-D")
    h, w = first.heatmap.shape
    units: dict[tuple[int, ...], ERFResult] = {}
    for r in field.values():
        units.setdefault(r.output_index, r)
    results = list(units.values())
    cy = np.array([r.theoretical_centre[0] for r in results])
    cx = np.array([r.theoretical_centre[1] for r in results])
    size = np.array([float(r.visible_size) for r in results])
    off = np.array([r.centroid_offset for r in results], dtype=float)
    off = np.nan_to_num(off)

    fig = Figure(figsize=(11.5, 5.2), dpi=110, layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    # The units on a matrix: one row per distinct output row index, one column per column
    # index (a k x k grid fills it; corners or edges leave cells empty).
    rows = sorted({r.output_index[0] for r in results})
    cols = sorted({r.output_index[1] for r in results})
    iy = np.array([rows.index(r.output_index[0]) for r in results])
    ix = np.array([cols.index(r.output_index[1]) for r in results])
    matrix = np.full((len(rows), len(cols)), np.nan)
    matrix[iy, ix] = size
    lo, hi = float(size.min()), float(size.max())
    top = hi if hi > lo else lo + 1.0
    mesh = ax.imshow(matrix, cmap=cmap, vmin=lo, vmax=top, interpolation="nearest")
    import matplotlib as mpl

    colours = mpl.colormaps[cmap]
    for y0, x0, s in zip(iy, ix, size):
        shade = colours((s - lo) / (top - lo))
        text = "black" if sum(shade[:3]) > 1.5 else "white"
        ax.text(x0, y0 + 0.3, f"{s:.0f}", ha="center", va="center", fontsize=8, color=text)
    longest = float(np.hypot(off[:, 0], off[:, 1]).max())
    scale = arrow_scale or (0.4 / longest if longest > 0 else 1.0)  # cells per pixel
    ax.quiver(
        ix, iy, off[:, 1] * scale, off[:, 0] * scale, angles="xy", scale_units="xy", scale=1,
        color="white", edgecolor="black", linewidth=0.6, width=0.008,
    )  # fmt: skip
    ax.plot(ix, iy, "k.", markersize=3)
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    arrows = (
        f"arrows: centroid offset, 1 cell = {1 / scale:.3g} px (longest {longest:.1f} px)"
        if longest > 0
        else "centroid offsets: all 0"
    )
    ax.set_xlabel(f"output column; {arrows}")
    ax.set_ylabel("output row")
    grid = field.centre.output_shape
    ax.set_title(
        f"visible ERF size (px) at {len(results)} unit(s) of the {grid[0]} x {grid[1]} output"
    )
    fig.colorbar(
        mesh, ax=ax, shrink=0.85, label="side of the 95%-mass square inside the image (px)"
    )

    overlay = np.zeros((h, w))
    for r in results:
        m = r.heatmap.detach().double().numpy()
        peak = float(m.max())
        if peak > 0:
            overlay = np.maximum(overlay, m / peak)
    ax2.imshow(overlay, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax2.plot(cx, cy, "c+", markersize=6)
    ax2.set_title("every unit's map / its max (overlay), + theoretical centres")
    ax2.set_xlabel("input x (px)")
    ax2.set_ylabel("input y (px)")
    ratio = field.border_ratio
    ratio_text = "n/a" if math.isnan(ratio) else f"{ratio:.2f}"
    fig.suptitle(title or f"ERF field of {first.name!r} ({first.mode}): border_ratio {ratio_text}")
    return fig


def render_field(field: ERFField, **kwargs: Any) -> np.ndarray:
    """The field figure as an RGB ``uint8`` array ``(H, W, 3)`` (for the sinks)."""
    fig = field_figure(field, **kwargs)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
