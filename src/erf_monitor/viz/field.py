"""The field figure: ERF size and centroid offset of every probed unit across the output plane.

:func:`field_figure` shows, across the output plane, the ERF size of every unit (colour) and
its centroid offset (arrows, from the unit's theoretical centre), so that the shrinking of
border units' fields and padding-induced shifts are visible at a glance; a second panel
overlays every unit's normalised map on the input plane (truncated fields, gridding).
Matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import math
import textwrap
from typing import TYPE_CHECKING, Any

import numpy as np

from erf_monitor.viz.render import colour_caption
from erf_monitor.viz.shapes import FieldLike, MapResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["field_figure", "render_field"]


def field_figure(
    field: FieldLike,
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
    units: dict[tuple[int, ...], MapResult] = {}
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
    caption = colour_caption([first.mode], unit="each probed unit")  # for newcomers
    fig.supxlabel(textwrap.fill(f"Right: c{caption[1:]}", 150), fontsize=8)
    return fig


def render_field(field: FieldLike, **kwargs: Any) -> np.ndarray:
    """The field figure as an RGB ``uint8`` array ``(H, W, 3)`` (for the sinks)."""
    fig = field_figure(field, **kwargs)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
