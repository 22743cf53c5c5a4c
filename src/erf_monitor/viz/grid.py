"""The models x layers grid figure: ERF maps of several models side by side, as published ERF
comparisons show them (RepLKNet's Fig. 1, VMamba's ERF figure).

One row per model, one column per layer (or per stage: see ``columns``), rows and columns
labelled, every panel on one colour scale with one colour bar:

* ``scale="peak"`` (default): each map divided by its own maximum, as the published figures
  do; the same colour is the same fraction of a map's peak in every panel.
* ``scale="mass"``: each map normalised to unit mass, then divided by the largest value in
  its column: the models of one column are on one absolute scale (a more concentrated ERF is
  brighter), which a per-map normalisation hides.

``log_scale`` compresses three decades below the reference maximum as everywhere in
erf-monitor (:func:`~erf_monitor.viz.render.normalize`).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from erf_monitor.viz.render import (
    LOG_DECADES,
    _legend_proxies,
    _to_numpy,
    add_box,
    colour_caption,
    nice_ticks,
)
from erf_monitor.viz.shapes import MapResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure

__all__ = ["Panel", "grid_figure"]

Columns = Literal["auto", "layer", "grid"]


@dataclass(frozen=True)
class Panel:
    """What one grid cell shows: a 2-D map and where its 95%-mass square lies.

    Attributes:
        heatmap: the ERF map (2-D array or tensor).
        layer: the layer's name (shown in the cell when columns are stages).
        output_shape: the layer's output grid (the column key with ``columns="grid"``).
        erf_size: side of the 95%-mass square (px), ``None``: no square drawn.
        centre_pixel: where the square is centred.
        mode: the ERF convention, named in the caption.
    """

    heatmap: np.ndarray
    layer: str = ""
    output_shape: tuple[int, ...] = ()
    erf_size: int | None = None
    centre_pixel: tuple[int, ...] | None = None
    #: the ERF convention (named in the figure's caption; ``""``: not known).
    mode: str = ""

    @classmethod
    def of(cls, result: MapResult) -> Panel:
        """The panel of a result (:class:`~erf_monitor.ERFResult`)."""
        return cls(
            heatmap=_to_numpy(result.heatmap),
            layer=result.name,
            output_shape=tuple(int(s) for s in result.output_shape),
            erf_size=int(result.erf_size),
            centre_pixel=tuple(int(c) for c in result.centre_pixel),
            mode=str(getattr(result, "mode", "")),
        )


def _panels(grid: Mapping[str, Mapping[str, MapResult | Panel]]) -> dict[str, dict[str, Panel]]:
    out: dict[str, dict[str, Panel]] = {}
    for model, layers in grid.items():
        out[model] = {
            name: p if isinstance(p, Panel) else Panel.of(p) for name, p in layers.items()
        }
    return out


def _grid_label(shape: tuple[int, ...], input_shape: tuple[int, ...]) -> str:
    size = "×".join(str(s) for s in shape)
    if shape and len(shape) == len(input_shape) and shape[0] > 0:
        stride = input_shape[0] / shape[0]
        if stride >= 1 and abs(stride - round(stride)) < 1e-9:
            return f"{size} (1/{round(stride)})"
    return size


def _columns(
    panels: dict[str, dict[str, Panel]], how: Columns
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Column labels and, per model, ``{column label: layer key}``."""
    names = [list(layers) for layers in panels.values()]
    if how == "auto":
        how = "layer" if all(n == names[0] for n in names) else "grid"
    if how == "layer":
        labels = list(dict.fromkeys(k for n in names for k in n))
        return labels, {m: {k: k for k in layers} for m, layers in panels.items()}
    # by output grid, largest (shallowest) first; the deepest layer of a model wins a tie
    inputs = [p.heatmap.shape for layers in panels.values() for p in layers.values()]
    input_shape = tuple(int(s) for s in inputs[0]) if inputs else ()
    keys: dict[str, dict[tuple[int, ...], str]] = {}
    for model, layers in panels.items():
        keys[model] = {}
        for name, p in layers.items():
            keys[model][p.output_shape] = name
    shapes = sorted({s for k in keys.values() for s in k}, key=lambda s: (-math.prod(s), s))
    labels = [_grid_label(s, input_shape) for s in shapes]
    cols = {
        model: {label: by[s] for s, label in zip(shapes, labels) if s in by}
        for model, by in keys.items()
    }
    return labels, cols


def _unit_mass(a: np.ndarray) -> np.ndarray:
    a = np.where(np.isfinite(a) & (a > 0), a, 0.0)
    total = float(a.sum())
    return a / total if total > 0 else a


def grid_figure(
    grid: Mapping[str, Mapping[str, MapResult | Panel]],
    *,
    columns: Columns = "auto",
    scale: Literal["peak", "mass"] = "peak",
    log_scale: bool = False,
    cmap: str = "inferno",
    boxes: bool = True,
    annotate: bool = True,
    panel_size: float = 1.8,
    title: str | None = None,
) -> Figure:
    """ERF maps of several models as a grid: a row per model, a column per layer or stage.

    Args:
        grid: ``{model name: {layer: result}}`` in row order, e.g.
            ``{"ResNet-18": compute_erf(r18, x, layers), "ConvNeXt": ...}`` (results or
            :class:`Panel` s; 2-D maps).
        columns: ``"layer"``: a column per layer name; ``"grid"``: a column per output grid
            (stage), largest first, labelled with the grid and its stride, so that models with
            different layer names line up by stage (each cell then names its layer);
            ``"auto"``: ``"layer"`` when every model has the same layer names, else
            ``"grid"``.
        scale: ``"peak"`` (each map by its maximum) or ``"mass"`` (unit-mass maps on one
            scale per column); see the module docstring.
        log_scale: log colour scale (three decades).
        cmap: matplotlib colormap name.
        boxes: outline each map's 95%-mass square (white, dashed).
        annotate: write each map's ERF size (and its layer when columns are stages) under
            its panel.
        panel_size: width of a panel in inches.
        title: figure title.

    Returns:
        A ``matplotlib.figure.Figure`` (no pyplot state): save it as PNG, PDF or SVG with
        ``fig.savefig``.

    Raises:
        ValueError: an empty grid, or a map that is not 2-D.
    """
    import matplotlib
    from matplotlib.figure import Figure

    panels = _panels(grid)
    _check_panels(panels)
    labels, cols = _columns(panels, columns)
    by_column = columns == "grid" or (
        columns == "auto" and len({tuple(v) for v in panels.values()}) > 1
    )
    if scale == "mass":
        ref = _column_peaks(panels, labels, cols)
    elif scale != "peak":
        raise ValueError(f"scale must be 'peak' or 'mass', got {scale!r}")
    nrows, ncols = len(panels), len(labels)
    fig = Figure(
        figsize=(panel_size * ncols + 1.6, panel_size * nrows + 0.6 + (0.3 if title else 0)),
        layout="constrained",
    )
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colormap = matplotlib.colormaps[cmap]
    squares = False
    for i, (model, layers) in enumerate(panels.items()):
        for j, label in enumerate(labels):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.tick_params(labelsize=6, length=2, pad=1)
            if i == 0:
                ax.set_title(label, fontsize=9)
            if j == 0:
                ax.set_ylabel(model, fontsize=9)
            key = cols[model].get(label)
            if key is None:  # this model has no layer here
                for side in ax.spines.values():
                    side.set_visible(False)
                continue
            peak = ref[label] if scale == "mass" else None
            drawn = _draw_panel(ax, layers[key], peak, log_scale, colormap, boxes)
            squares = squares or drawn
            if annotate:
                _annotate_panel(ax, layers[key], by_column)
    _colour_bar(fig, axes, colormap, nrows, scale, log_scale)
    modes = [p.mode for layers in panels.values() for p in layers.values()]
    caption = colour_caption(modes, log_scale) + " Axes: input pixels."
    if by_column:
        caption += " Columns: the layers' output grid (its size as a fraction of the input's)."
    if scale == "mass":
        caption += " Each column on one scale: unit-mass maps over the column's maximum."
    caption = textwrap.fill(caption, int(17 * (panel_size * ncols + 1.6)))
    if squares:  # the caption heads the legend: one block under the panels
        handles = _legend_proxies({"95% mass"}, cmap)
        fig.legend([h for h, _ in handles], ["square holding 95% of the ERF's mass"],
                   loc="outside lower center", fontsize=7, frameon=False, handlelength=3.0,
                   handleheight=1.6, title=caption, title_fontsize=7)  # fmt: skip
    else:
        fig.supxlabel(caption, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _check_panels(panels: dict[str, dict[str, Panel]]) -> None:
    if not panels or not any(panels.values()):
        raise ValueError("grid_figure needs at least one model with one layer")
    for model, layers in panels.items():
        for name, p in layers.items():
            if p.heatmap.ndim != 2:
                raise ValueError(
                    f"grid_figure draws 2-D maps; {model!r} {name!r} has shape {p.heatmap.shape}"
                )


def _column_peaks(
    panels: dict[str, dict[str, Panel]], labels: list[str], cols: dict[str, dict[str, str]]
) -> dict[str, float]:
    """Per column, the largest value of its unit-mass maps (``scale="mass"``'s reference)."""
    return {
        label: max(
            (float(_unit_mass(panels[m][cols[m][label]].heatmap).max())
             for m in panels if label in cols[m]),
            default=0.0,
        )
        for label in labels
    }  # fmt: skip


def _draw_panel(
    ax: Axes, p: Panel, mass_peak: float | None, log_scale: bool, colormap: Colormap, boxes: bool
) -> bool:
    """One map on ``ax`` over its own peak (``mass_peak``: as a unit-mass map over its
    column's); returns whether its 95%-mass square was drawn."""
    a = np.where(np.isfinite(p.heatmap) & (p.heatmap > 0), p.heatmap, 0.0)
    if mass_peak is not None:
        a, peak = _unit_mass(a), mass_peak
    else:
        peak = float(a.max()) if a.size else 0.0
    v = np.clip(a / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(a)
    if log_scale:
        v = _log(v)
    ax.imshow(v, cmap=colormap, vmin=0.0, vmax=1.0, interpolation="nearest")
    square = False
    if boxes and p.erf_size is not None and p.centre_pixel is not None and a.max() > 0:
        half = int(p.erf_size) // 2
        (cy, cx) = p.centre_pixel[:2]
        add_box(ax, (cy - half, cy + half), (cx - half, cx + half), "white", lw=0.8, ls="--")
        square = True
    ax.set_xlim(-0.5, a.shape[1] - 0.5)
    ax.set_ylim(a.shape[0] - 0.5, -0.5)
    ax.set_xticks(nice_ticks(a.shape[1], 3))  # input pixels
    ax.set_yticks(nice_ticks(a.shape[0], 3))
    return square


def _annotate_panel(ax: Axes, p: Panel, by_column: bool) -> None:
    """The ERF size under the panel (and its layer when columns are stages)."""
    text = [] if not by_column else [p.layer or "<model>"]
    if p.erf_size is not None:
        text.append(f"ERF {p.erf_size} px")
    ax.set_xlabel(" · ".join(text), fontsize=7, labelpad=2)


def _colour_bar(
    fig: Figure, axes: Any, colormap: Colormap, nrows: int, scale: str, log_scale: bool
) -> None:
    """The one colour bar right of the panels (log ticks at the decades)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    what = "ERF / its maximum" if scale == "peak" else "unit-mass ERF / column maximum"
    bar = fig.colorbar(
        ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colormap),
        ax=axes,
        shrink=min(0.9, 0.35 + 0.2 * nrows),
        location="right",
    )
    if log_scale:
        ticks = [1.0, 0.1, 0.01, 0.001, 0.0]
        bar.set_ticks([float(_log(t)) for t in ticks], labels=["1", "0.1", "0.01", "0.001", "0"])
    bar.set_label(what + (" (log)" if log_scale else ""), fontsize=8)
    bar.ax.tick_params(labelsize=7)


def _log(v: np.ndarray | float) -> np.ndarray:
    """The log colour scale of :func:`~erf_monitor.viz.render.normalize` on ``[0, 1]``."""
    scale = 10.0**LOG_DECADES
    return np.log10(1.0 + np.asarray(v, dtype=float) * scale) / math.log10(1.0 + scale)
