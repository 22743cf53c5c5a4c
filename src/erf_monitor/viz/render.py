"""Rendering of ERF maps: colormapped images for loggers and matplotlib figures for reports.

Everything renders with NumPy and matplotlib's Agg canvas only (no pyplot, no display, no
fonts needed for the logged images), so it is safe inside a training loop.

Conventions used by every function here:

* Maps are normalised by their maximum to ``[0, 1]`` (negative values and NaN count as 0).
* ``log_scale=True`` maps a normalised value ``v`` to
  ``log10(1 + v / 1e-3) / log10(1 + 1e3)``: three decades below the peak are spread over the
  colour range and values below ``1e-3 * max`` all look like the background.
* Boxes are drawn in input-pixel coordinates: the **TRF box** (cyan) is the clipped
  theoretical receptive field ``result.trf.clipped``; the **ERF box** (white) is the square of
  side ``result.erf_size`` (the 95%-mass extent) centred at ``result.centre_pixel``. An ERF
  edge that falls outside the input is not drawn.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from functools import lru_cache
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from erf_monitor.trf.types import wrap_flags
from erf_monitor.viz.shapes import MapResult

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure


__all__ = [
    "CENTRE_COLOR",
    "ERF_COLOR",
    "LOG_DECADES",
    "TRF_COLOR",
    "add_box",
    "colorize",
    "colour_caption",
    "erf_figure",
    "erf_interval",
    "nice_ticks",
    "normalize",
    "render_heatmap",
    "render_map",
    "save_png",
    "trf_interval",
]

#: RGB colour of the clipped-TRF outline.
TRF_COLOR: tuple[int, int, int] = (0, 255, 255)
#: RGB colour of the 95%-mass (ERF size) outline.
ERF_COLOR: tuple[int, int, int] = (255, 255, 255)
#: RGB colour of the cross marking the centre unit (drawn when it is off the image centre).
CENTRE_COLOR: tuple[int, int, int] = (0, 255, 0)
#: Number of decades below the peak that ``log_scale=True`` spreads over the colour range.
LOG_DECADES: float = 3.0
_GAP_COLOR: tuple[int, int, int] = (40, 40, 40)


def _to_numpy(heatmap: torch.Tensor | np.ndarray) -> np.ndarray:
    if hasattr(heatmap, "detach"):  # torch.Tensor without importing torch here
        heatmap = heatmap.detach().to("cpu").float().numpy()
    return np.asarray(heatmap, dtype=np.float64)


def normalize(heatmap: torch.Tensor | np.ndarray, log_scale: bool = False) -> np.ndarray:
    """Scale a map to ``[0, 1]`` by its maximum (optionally on a log scale).

    Args:
        heatmap: map of any shape; NaN, infinities and negative values are treated as 0.
        log_scale: apply ``log10(1 + v * 10**LOG_DECADES) / LOG_DECADES``-style compression
            (exactly ``log10(1 + v / 1e-3) / log10(1 + 1e3)``) after max-normalisation.

    Returns:
        float64 array of the same shape with values in ``[0, 1]``; all zeros for a zero map.

    Examples:
        >>> normalize(np.array([0.0, 1.0, 4.0])).tolist()
        [0.0, 0.25, 1.0]
        >>> normalize(np.zeros(3), log_scale=True).tolist()
        [0.0, 0.0, 0.0]
    """
    a = _to_numpy(heatmap)
    a = np.where(np.isfinite(a) & (a > 0), a, 0.0)
    peak = float(a.max()) if a.size else 0.0
    if peak <= 0.0:
        return np.zeros_like(a)
    v = a / peak
    if log_scale:
        scale = 10.0**LOG_DECADES
        v = np.log10(1.0 + v * scale) / math.log10(1.0 + scale)
    return np.clip(v, 0.0, 1.0)


@lru_cache(maxsize=32)
def _lut(cmap: str) -> np.ndarray:
    """256-entry uint8 RGB lookup table of a matplotlib colormap."""
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(
            f"Unknown colormap {cmap!r}; use one of matplotlib.colormaps, e.g. "
            "'inferno', 'viridis', 'magma', 'turbo', 'gray'"
        ) from None
    rgba = colormap(np.linspace(0.0, 1.0, 256))
    return np.round(rgba[:, :3] * 255.0).astype(np.uint8)


def colorize(
    heatmap: torch.Tensor | np.ndarray, cmap: str = "inferno", log_scale: bool = False
) -> np.ndarray:
    """Colour a 2-D map with a matplotlib colormap.

    Args:
        heatmap: 2-D map (tensor or array), ``>= 0``; see :func:`normalize` for the scaling.
        cmap: name in ``matplotlib.colormaps``.
        log_scale: colour ``log10(1 + v / 1e-3) / log10(1 + 1e3)`` of the max-normalised
            value ``v`` instead of ``v`` (shows the faint tails of the ERF).

    Returns:
        ``(H, W, 3)`` uint8 RGB image; a zero map is uniformly the colormap's bottom colour.

    Raises:
        ValueError: if the map is not 2-D or the colormap is unknown.

    Examples:
        >>> img = colorize(np.eye(3))
        >>> img.shape, img.dtype.name
        ((3, 3, 3), 'uint8')
        >>> bool((colorize(np.zeros((2, 2))) == colorize(np.zeros((1, 1)))[0, 0]).all())
        True
    """
    a = _to_numpy(heatmap)
    if a.ndim != 2:
        raise ValueError(f"colorize expects a 2-D map, got shape {tuple(a.shape)}")
    index = np.rint(normalize(a, log_scale) * 255.0).astype(np.intp)
    return _lut(cmap)[index]


# -- boxes ----------------------------------------------------------------------------------
def erf_interval(result: MapResult, dim: int) -> tuple[int, int]:
    """Inclusive input interval of the ERF square along ``dim`` (may exceed the input)."""
    half = int(result.erf_size) // 2
    c = int(result.centre_pixel[dim])
    return c - half, c + half


def trf_interval(result: MapResult, dim: int) -> tuple[int, int] | None:
    """Inclusive input interval of the TRF box along ``dim`` (``None``: no finite box)."""
    if result.trf is None or result.trf.data_dependent:  # no finite box to draw
        return None
    if _wraps(result, dim):  # the unclipped interval, drawn in every period it reaches
        lo, hi = result.trf.interval[dim]
        return int(lo), int(hi)
    s, e = result.trf.clipped[dim]
    return int(s), int(e)


def _wraps(result: MapResult, dim: int) -> bool:
    return wrap_flags(result.wrapped, result.heatmap.dim())[dim]


def _spans(result: MapResult, dim: int, span: tuple[int, int]) -> list[tuple[int, int]]:
    """Where ``span`` is drawn along ``dim``: itself, or where the field wraps around the
    input (circular padding), its copies one period either side, so that the box is seen in
    both pieces and no edge is drawn where the input's border cuts it."""
    if not _wraps(result, dim):
        return [span]
    n = int(result.heatmap.shape[dim])
    if span[1] - span[0] + 1 >= n:
        return [(-1, n)]  # all of it: both edges outside the input
    return [(span[0] + k * n, span[1] + k * n) for k in (-1, 0, 1)]


def _boxes(
    result: MapResult, dims: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    return [(r, c) for r in _spans(result, dims[0], rows) for c in _spans(result, dims[1], cols)]


def _draw_rect(
    img: np.ndarray,
    rows: tuple[int, int],
    cols: tuple[int, int],
    factor: int,
    color: tuple[int, int, int],
    thickness: int,
    dash: int = 0,
) -> None:
    """Outline the input-pixel rectangle ``rows x cols`` (inclusive) on an upscaled image.

    The outline lies on the rectangle's own border pixels (inside it). Edges outside the
    image are skipped; the visible parts of the other edges are still drawn. ``dash > 0``
    draws dashes of that many pixels (corners always drawn), so that a box drawn over
    another on the same pixels leaves both colours visible.
    """
    h, w = img.shape[:2]
    y0, y1 = rows[0] * factor, (rows[1] + 1) * factor - 1
    x0, x1 = cols[0] * factor, (cols[1] + 1) * factor - 1
    if y1 < 0 or x1 < 0 or y0 >= h or x0 >= w or y1 < y0 or x1 < x0:
        return
    t = max(1, min(thickness, y1 - y0 + 1, x1 - x0 + 1))
    cy0, cy1 = max(y0, 0), min(y1, h - 1)
    cx0, cx1 = max(x0, 0), min(x1, w - 1)

    def on(start: int, lo: int, hi: int, end: int) -> np.ndarray:
        idx = np.arange(lo, hi + 1)
        if dash <= 0:
            return np.ones(idx.shape, dtype=bool)
        dashes = ((idx - start) // dash) % 2 == 0
        return dashes | (idx >= end - t + 1) | (idx < start + t)  # and the corners

    xs, ys = on(x0, cx0, cx1, x1), on(y0, cy0, cy1, y1)
    if y0 >= 0:  # top
        img[y0 : y0 + t, cx0 : cx1 + 1][:, xs] = color
    if y1 < h:  # bottom
        img[y1 - t + 1 : y1 + 1, cx0 : cx1 + 1][:, xs] = color
    if x0 >= 0:  # left
        img[cy0 : cy1 + 1, x0 : x0 + t][ys] = color
    if x1 < w:  # right
        img[cy0 : cy1 + 1, x1 - t + 1 : x1 + 1][ys] = color


def _upscale(img: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return img
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def _factor(shape: Sequence[int], min_size: int) -> int:
    return max(1, math.ceil(min_size / max(max(shape), 1)))


def _thickness(rendered_size: int) -> int:
    return 2 if rendered_size >= 256 else 1


def _dash(thickness: int) -> int:
    return 3 * thickness


def _render_2d(
    a: np.ndarray,
    result: MapResult,
    dims: tuple[int, int],
    factor: int,
    cmap: str,
    log_scale: bool,
    draw_trf: bool,
    draw_extent: bool,
    thickness: int | None = None,
) -> np.ndarray:
    img = _upscale(colorize(a, cmap, log_scale), factor)
    t = thickness if thickness is not None else _thickness(max(img.shape[:2]))
    if draw_trf:
        rows, cols = trf_interval(result, dims[0]), trf_interval(result, dims[1])
        if rows is not None and cols is not None:
            for r, c in _boxes(result, dims, rows, cols):
                _draw_rect(img, r, c, factor, TRF_COLOR, t)
    if draw_extent and a.max() > 0:
        square = (erf_interval(result, dims[0]), erf_interval(result, dims[1]))
        for r, c in _boxes(result, dims, *square):  # dashed: a TRF box beneath stays seen
            _draw_rect(img, r, c, factor, ERF_COLOR, t, dash=_dash(t))
    return img


def _figure_to_rgb(fig: Figure) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]


def _render_1d(
    a: np.ndarray,
    result: MapResult,
    cmap: str,
    log_scale: bool,
    draw_trf: bool,
    draw_extent: bool,
    min_size: int,
    step: int | None = None,
    metrics: Mapping[str, float] | None = None,
) -> np.ndarray:
    from matplotlib.figure import Figure

    dpi = 100
    width = max(min_size, 320)
    fig = Figure(figsize=(width * 1.6 / dpi, width / dpi), dpi=dpi)
    ax = fig.add_subplot()
    _plot_1d(ax, a, result, cmap, log_scale, draw_trf, draw_extent)
    if step is not None:
        title = f"{result.name or '<model>'} · step {int(step)}\n{_metrics_line(result, metrics)}"
        ax.set_title(title, fontsize=9)
    fig.tight_layout(pad=0.4)
    return _figure_to_rgb(fig)


def _plot_1d(
    ax: Any,
    a: np.ndarray,
    result: MapResult,
    cmap: str,
    log_scale: bool,
    draw_trf: bool,
    draw_extent: bool,
) -> None:
    import matplotlib

    v = normalize(a, log_scale)
    x = np.arange(v.shape[0])
    line = matplotlib.colormaps[cmap](0.6)
    if draw_trf and (trf := trf_interval(result, 0)) is not None:
        ax.axvspan(trf[0] - 0.5, trf[1] + 0.5, color="tab:cyan", alpha=0.2, lw=0, label="TRF")
    ax.fill_between(x, v, color=line, alpha=0.35, lw=0)
    ax.plot(x, v, color=line, lw=1.5)
    if draw_extent and v.max() > 0:
        lo, hi = erf_interval(result, 0)
        ax.axvline(lo - 0.5, color="0.2", ls="--", lw=1, label="95% mass")
        ax.axvline(hi + 0.5, color="0.2", ls="--", lw=1)
    ax.set_xlim(-0.5, v.shape[0] - 0.5)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("input position (px)")
    ax.set_ylabel("ERF (log, norm.)" if log_scale else "ERF (norm.)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize="small", frameon=False)


# 3-D maps (z, y, x): max-projections along z, y and x, tiled left to right.
_PROJECTIONS: tuple[tuple[int, tuple[int, int], str], ...] = (
    (0, (1, 2), "yx"),
    (1, (0, 2), "zx"),
    (2, (0, 1), "zy"),
)


def _render_3d(
    a: np.ndarray,
    result: MapResult,
    cmap: str,
    log_scale: bool,
    draw_trf: bool,
    draw_extent: bool,
    min_size: int,
) -> np.ndarray:
    factor = _factor(a.shape, min_size)
    # All projections share the global maximum, so their colours are comparable.
    clean = np.where(np.isfinite(a) & (a > 0), a, 0.0)
    thickness = _thickness(factor * max(a.shape))
    tiles = [
        _render_2d(
            clean.max(axis=axis),
            result,
            dims,
            factor,
            cmap,
            log_scale,
            draw_trf,
            draw_extent,
            thickness,
        )
        for axis, dims, _ in _PROJECTIONS
    ]
    gap = max(2, factor)
    height = max(t.shape[0] for t in tiles)
    width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[:] = _GAP_COLOR
    x = 0
    for tile in tiles:
        out[: tile.shape[0], x : x + tile.shape[1]] = tile
        x += tile.shape[1] + gap
    return out


def render_map(
    result: MapResult,
    *,
    cmap: str = "inferno",
    log_scale: bool = False,
    draw_trf: bool = True,
    draw_extent: bool = True,
    min_size: int = 256,
) -> np.ndarray:
    """Render one layer's ERF map alone (no title, colour bar or legend; see
    :func:`render_heatmap` for the annotated picture that loggers get).

    * **2-D** maps are colormapped and upscaled by the smallest integer factor (nearest
      neighbour, so pixels stay crisp) that makes the longer side at least ``min_size`` px.
      The clipped TRF box (cyan) and the ERF square (white, side ``result.erf_size`` centred
      at ``result.centre_pixel``) are drawn as 1 px (images under 256 px) or 2 px outlines on
      the border pixels of the boxes.
    * **1-D** maps become a curve plot (matplotlib Agg) of the normalised map, TRF interval
      shaded cyan, ERF interval as dashed lines.
    * **3-D** maps ``(z, y, x)`` become the three **max-projections** along z, y and x (planes
      yx, zx, zy), rendered like 2-D maps with their boxes and tiled left to right on a dark
      grey background; all share the map's global maximum.

    Args:
        result: the layer's :class:`~erf_monitor.ERFResult`.
        cmap: matplotlib colormap name.
        log_scale: log colour scale, see :func:`normalize`.
        draw_trf: outline the clipped TRF (skipped when ``result.trf`` is ``None``).
        draw_extent: outline the 95%-mass square (skipped for a zero map).
        min_size: minimum rendered size in pixels of the longer side (2-D/3-D tiles) or the
            plot height (1-D).

    Returns:
        ``(H, W, 3)`` uint8 RGB image.

    Raises:
        ValueError: for maps with 0 or more than 3 dimensions.
    """
    a = _to_numpy(result.heatmap)
    if a.ndim == 2:
        return _render_2d(
            a,
            result,
            (0, 1),
            _factor(a.shape, min_size),
            cmap,
            log_scale,
            draw_trf,
            draw_extent,
        )
    if a.ndim == 1:
        return _render_1d(a, result, cmap, log_scale, draw_trf, draw_extent, min_size)
    if a.ndim == 3:
        return _render_3d(a, result, cmap, log_scale, draw_trf, draw_extent, min_size)
    raise ValueError(
        f"Cannot render the ERF map of layer {result.name!r}: expected 1-3 spatial dims, "
        f"got shape {tuple(a.shape)}"
    )


# -- annotated pictures --------------------------------------------------------------------
_BG: tuple[int, int, int] = (28, 28, 30)
_FG: tuple[int, int, int] = (235, 235, 235)
_DIM: tuple[int, int, int] = (165, 165, 170)
_PAD = 8


@lru_cache(maxsize=8)
def _font(size: int, bold: bool = False) -> Any:
    """DejaVu Sans from matplotlib's own data (no system fonts needed), else PIL's default."""
    from PIL import ImageFont

    try:
        import matplotlib

        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        return ImageFont.truetype(str(Path(matplotlib.get_data_path(), "fonts", "ttf", name)), size)
    except (ImportError, OSError):  # pragma: no cover - matplotlib ships these fonts
        return ImageFont.load_default()


def _off_centre(result: MapResult, shape: Sequence[int]) -> bool:
    """Whether the centre unit's pixel differs from the image centre (``s // 2`` per axis)."""
    return tuple(int(c) for c in result.centre_pixel) != tuple(int(s) // 2 for s in shape)


def _draw_cross(img: np.ndarray, centre: Sequence[int], factor: int) -> None:
    """A centre-unit cross on an upscaled 2-D image (arms of ~1.5 input pixels, >= 5 px)."""
    h, w = img.shape[:2]
    cy, cx = (int(c) * factor + factor // 2 for c in centre)
    arm = max(5, (3 * factor) // 2)
    t = 1 if max(h, w) < 256 else 2
    lo = -(t // 2)
    img[max(cy + lo, 0) : max(cy + lo + t, 0), max(cx - arm, 0) : max(cx + arm + 1, 0)] = (
        CENTRE_COLOR
    )
    img[max(cy - arm, 0) : max(cy + arm + 1, 0), max(cx + lo, 0) : max(cx + lo + t, 0)] = (
        CENTRE_COLOR
    )


def _colorbar(
    height: int, cmap: str, log_scale: bool
) -> tuple[np.ndarray, list[tuple[float, str]]]:
    """A vertical colour bar (max at the top) and its ticks as ``(fraction from top, label)``."""
    bar = _lut(cmap)[np.linspace(255, 0, height).round().astype(np.intp)]
    if log_scale:
        values = [1.0, 1e-1, 1e-2, 1e-3, 0.0]
        labels = ["1", "0.1", "0.01", "0.001", "0"]
    else:
        values = [1.0, 0.75, 0.5, 0.25, 0.0]
        labels = ["1", "0.75", "0.5", "0.25", "0"]
    pos = normalize(np.array(values), log_scale=log_scale) if log_scale else np.array(values)
    return bar, [(1.0 - float(p), lab) for p, lab in zip(pos, labels)]


def _metrics_line(result: MapResult, metrics: Mapping[str, float] | None = None) -> str:
    """``ERF 23 px · coverage 51.7% · ERF/TRF 0.72`` (from ``metrics`` when given: the
    metrics are not cached and cost more than the picture on large maps)."""
    if metrics is None:
        metrics = {
            "erf_size": result.erf_size,
            "coverage": result.coverage,
            "erf_trf_ratio": result.ratio,
        }
    ratio = metrics.get("erf_trf_ratio", math.nan)
    return f"ERF {metrics['erf_size']:.0f} px · coverage {metrics['coverage']:.1%} · ERF/TRF " + (
        "n/a" if not math.isfinite(ratio) else f"{ratio:.2f}"
    )


def _describe_trf(result: MapResult) -> str:
    trf = result.trf
    if trf is None:
        return "TRF unknown"
    if trf.is_global:
        return "TRF global"
    if any(result.wrapped):
        return f"TRF {trf.clipped_text('×')} px, wraps around the border"
    return f"TRF (clipped) {trf.clipped_text('×')} px"


def nice_ticks(n: int, most: int = 5) -> list[int]:
    """Input-pixel ticks ``0, step, ...`` (step 1, 2, 5 x 10^k) with at most ``most`` of them."""
    step = next(
        s for k in range(12) for s in (10**k, 2 * 10**k, 5 * 10**k) if math.ceil(n / s) <= most
    )
    return list(range(0, max(n, 1), step))


def _wrap_text(text: str, font: Any, width: float) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels."""
    from PIL import Image, ImageDraw

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split(" "):
        if lines and probe.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def _annotate(
    core: np.ndarray,
    result: MapResult,
    *,
    step: int | None,
    cmap: str,
    log_scale: bool,
    boxes: Sequence[tuple[tuple[int, int, int], str, str]],
    note: str | None = None,
    metrics: Mapping[str, float] | None = None,
    axes: tuple[Sequence[int], int] | None = None,
) -> np.ndarray:
    """Frame ``core`` with a title (layer, step), metrics, pixel axes, a colour bar, a legend
    and a caption (``note``, wrapped).

    ``boxes`` are legend entries ``(colour, kind, label)`` with kind ``"box"``, ``"dashed"``
    or ``"cross"``; ``axes`` is the map's input shape ``(H, W)`` and its upscaling factor
    (``None``: no axes, e.g. tiled 3-D projections).
    Drawn with PIL (a few milliseconds), not matplotlib: this runs at every probe.
    """
    from PIL import Image, ImageDraw

    h, w = core.shape[:2]
    title_f, text_f, small_f = _font(15, bold=True), _font(12), _font(11)
    subtitle = _metrics_line(result, metrics)
    title = (result.name or "<model>") + ("" if step is None else f" · step {int(step)}")
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    yticks = nice_ticks(int(axes[0][0])) if axes else []
    xticks = nice_ticks(int(axes[0][1])) if axes else []
    axis_w = int(max((probe.textlength(str(t), font=small_f) for t in yticks), default=0))
    axis_w = axis_w + 6 if axes else 0  # labels, then a 3 px tick mark
    axis_h = 16 if axes else 0
    left = _PAD + axis_w
    bar_w, label_w = 12, 44
    width = max(left + w + 10 + bar_w + 4 + label_w + _PAD, 300)
    # legend entries wrap onto as many lines as the width needs
    entries = [(c, k, lab, 22 + probe.textlength(lab, font=small_f)) for c, k, lab in boxes]
    lines: list[list[tuple[tuple[int, int, int], str, str, float]]] = [[]]
    x = 0.0
    for entry in entries:
        if lines[-1] and x + entry[3] > width - 2 * _PAD:
            lines.append([])
            x = 0.0
        lines[-1].append(entry)
        x += entry[3] + 14
    lines = [line for line in lines if line]
    notes = _wrap_text(note, small_f, width - 2 * _PAD) if note else []
    top = _PAD + 20 + 17 + 6
    legend_y = top + h + axis_h + 8
    height = legend_y + 17 * len(lines) + 15 * len(notes) + _PAD
    canvas = Image.new("RGB", (int(width), int(height)), _BG)
    canvas.paste(Image.fromarray(np.ascontiguousarray(core)), (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((_PAD, _PAD), title, font=title_f, fill=_FG)
    draw.text((_PAD, _PAD + 20), subtitle, font=text_f, fill=_DIM)
    if axes:  # ticks at pixel centres, labelled in input pixels
        f = axes[1]
        for t in yticks:
            y = top + t * f + f // 2
            draw.line([(left - 3, y), (left - 1, y)], fill=_DIM)
            draw.text((left - 5, y), str(t), font=small_f, fill=_DIM, anchor="rm")
        for t in xticks:
            x = left + t * f + f // 2
            draw.line([(x, top + h), (x, top + h + 2)], fill=_DIM)
            draw.text((x, top + h + 3), str(t), font=small_f, fill=_DIM, anchor="mt")
    bar, ticks = _colorbar(h, cmap, log_scale)
    bx = left + w + 10
    canvas.paste(Image.fromarray(np.repeat(bar[:, None, :], bar_w, axis=1)), (bx, top))
    for frac, label in ticks:
        y = top + round(frac * (h - 1))
        draw.text((bx + bar_w + 4, y), label, font=small_f, fill=_FG, anchor="lm")
    y = legend_y
    for line in lines:
        x = float(_PAD)
        for color, kind, label, span in line:
            if kind == "cross":
                draw.line([(x + 2, y + 7), (x + 14, y + 7)], fill=color, width=2)
                draw.line([(x + 8, y + 1), (x + 8, y + 13)], fill=color, width=2)
            elif kind == "dashed":  # the dashed square as the map shows it
                for a, b in ((x, x + 4), (x + 7, x + 10), (x + 13, x + 16)):
                    draw.line([(a, y + 2), (b, y + 2)], fill=color, width=2)
                    draw.line([(a, y + 12), (b, y + 12)], fill=color, width=2)
                draw.line([(x, y + 2), (x, y + 12)], fill=color, width=2)
                draw.line([(x + 16, y + 2), (x + 16, y + 12)], fill=color, width=2)
            else:
                draw.rectangle([(x, y + 2), (x + 16, y + 12)], outline=color, width=2)
            draw.text((x + 22, y + 7), label, font=small_f, fill=_FG, anchor="lm")
            x += span + 14
        y += 17
    for text in notes:
        draw.text((_PAD, y + 7), text, font=small_f, fill=_DIM, anchor="lm")
        y += 15
    return np.asarray(canvas)


#: What each mode's map is, in words (captions; the exact formulas: ``core.modes.DEFINITIONS``).
MODE_WORDS: dict[str, str] = {
    "luo": "mode luo: mean |gradient| over the probe images (Luo et al.)",
    "replknet": "mode replknet: positive gradients, mean over the probe images, then "
    "log10(1 + x) as RepLKNet plots it",
    "openerf": "mode openerf: clamped channel-mean gradient, total mass 1 (OpenERF)",
}


def colour_caption(
    modes: Sequence[str] = (), log_scale: bool = False, unit: str = "the layer's centre unit"
) -> str:
    """One line for a figure: what colour means and what the mode is, for someone who has
    never heard of an ERF (``unit``: whose ERF the maps are)."""
    scale = "log scale, 3 decades" if log_scale else "linear scale"
    text = (
        f"Colour: how much each input pixel moves {unit} (its effective receptive field, "
        f"ERF), relative to the strongest ({scale})."
    )
    words = [MODE_WORDS[m] for m in dict.fromkeys(modes) if m in MODE_WORDS]
    return text + "".join(f" {w[0].upper()}{w[1:]}." for w in words)


def _square_label(result: MapResult, shape: Sequence[int]) -> str:
    """The 95%-mass square's legend entry; said when its edges fall outside the map."""
    label = f"95%-mass square, side {result.erf_size} px"
    if any(int(result.erf_size) > n for n in shape):
        label += ", wider than the image"
    return label


def render_heatmap(
    result: MapResult,
    *,
    step: int | None = None,
    cmap: str = "inferno",
    log_scale: bool = False,
    draw_trf: bool = True,
    draw_extent: bool = True,
    min_size: int = 256,
    annotate: bool = True,
    metrics: Mapping[str, float] | None = None,
) -> np.ndarray:
    """Render one layer's ERF map as a self-explaining RGB image (what loggers get).

    The map (see :func:`render_map`: crisp nearest-neighbour upscaling to at least
    ``min_size`` px, TRF box cyan, 95%-mass square white) is framed by:

    * a title with the layer name and the training ``step``, and a line with the ERF size,
      coverage and ERF/TRF ratio;
    * a colour bar of the ERF relative to its maximum, ticked on its scale (linear: 0 ... 1;
      ``log_scale``: 0.001, 0.01, 0.1, 1);
    * a legend: the TRF box (with its clipped size), the 95%-mass square (with its side) and,
      when the centre unit's pixel is not the image centre (``s // 2`` per axis), a green cross
      marking it (also drawn on the map); and the scale in words.

    Rendering uses NumPy and PIL only (a few milliseconds at 224 x 224); 1-D maps are a
    matplotlib curve plot titled the same way.

    Args:
        result: the layer's :class:`~erf_monitor.ERFResult`.
        step: training step shown in the title (``None``: not shown).
        cmap: matplotlib colormap name.
        log_scale: log colour scale, see :func:`normalize`.
        draw_trf: outline the clipped TRF (skipped when ``result.trf`` is ``None``).
        draw_extent: outline the 95%-mass square (skipped for a zero map).
        min_size: minimum size in pixels of the map's longer side.
        annotate: ``False`` returns :func:`render_map`'s bare map.
        metrics: the result's ``scalars()`` if already computed (saves recomputing them).

    Returns:
        ``(H, W, 3)`` uint8 RGB image.

    Raises:
        ValueError: for maps with 0 or more than 3 dimensions.

    Examples:
        >>> import torch, erf_monitor as em
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1))
        >>> r = em.compute_erf(net, torch.randn(2, 1, 16, 16), ["0"])["0"]
        >>> img = render_heatmap(r, step=100)
        >>> img.dtype.name, img.shape[2], img.shape[0] > 256
        ('uint8', 3, True)
    """
    a = _to_numpy(result.heatmap)
    if annotate and a.ndim == 1:
        return _render_1d(
            a, result, cmap, log_scale, draw_trf, draw_extent, min_size, step, metrics
        )
    core = render_map(
        result,
        cmap=cmap,
        log_scale=log_scale,
        draw_trf=draw_trf,
        draw_extent=draw_extent,
        min_size=min_size,
    )
    if not annotate:
        return core
    boxes: list[tuple[tuple[int, int, int], str, str]] = []
    dependent = result.trf is not None and result.trf.data_dependent
    if draw_trf and result.trf is not None and not dependent:
        boxes.append((TRF_COLOR, "box", _describe_trf(result)))
    if draw_extent and a.max() > 0:
        boxes.append((ERF_COLOR, "dashed", _square_label(result, a.shape)))
    note = None
    if a.ndim == 2 and _off_centre(result, a.shape):
        core = core.copy()
        _draw_cross(core, result.centre_pixel, _factor(a.shape, min_size))
        boxes.append(
            (
                CENTRE_COLOR,
                "cross",
                "centre unit at (" + ", ".join(str(int(c)) for c in result.centre_pixel) + ")",
            )
        )
    elif a.ndim == 3:
        note = "max-projections: yx | zx | zy"
    if dependent:  # said whatever draw_trf is: there is no box to draw or leave out
        note = "TRF data-dependent, no box" + (f" · {note}" if note else "")
    mode = getattr(result, "mode", None)
    caption = colour_caption([mode] if mode else [], log_scale)
    if a.ndim == 2:
        caption += " Axes: input pixels."
    note = caption + (f" {note[0].upper()}{note[1:]}." if note else "")
    return _annotate(
        core,
        result,
        step=step,
        cmap=cmap,
        log_scale=log_scale,
        boxes=boxes,
        note=note,
        metrics=metrics,
        axes=(a.shape, _factor(a.shape, min_size)) if a.ndim == 2 else None,
    )


# -- figures --------------------------------------------------------------------------------
def _panel_title(result: MapResult) -> str:
    trf_text = "TRF ?" if result.trf is None else f"TRF {result.trf.short_text('×')}"
    ratio = result.ratio
    ratio_text = "n/a" if not math.isfinite(ratio) else f"{ratio:.2f}"
    return (
        f"{result.name or '<model>'}\n{trf_text} · ERF {result.erf_size} · "
        f"ratio {ratio_text} · cov {result.coverage:.1%}"
    )


def _as_list(results: Mapping[str, MapResult] | Sequence[MapResult]) -> list[MapResult]:
    if isinstance(results, Mapping):
        return list(results.values())
    if hasattr(results, "heatmap"):  # a single MapResult
        return [results]  # type: ignore[list-item]
    return list(results)


def add_box(ax: Any, rows: tuple[int, int], cols: tuple[int, int], color: Any, **kw: Any) -> None:
    """Outline the pixels ``rows`` x ``cols`` (inclusive) on the matplotlib axes ``ax``."""
    from matplotlib.patches import Rectangle

    ax.add_patch(
        Rectangle(
            (cols[0] - 0.5, rows[0] - 0.5),
            cols[1] - cols[0] + 1,
            rows[1] - rows[0] + 1,
            fill=False,
            edgecolor=color,
            **kw,
        )
    )


def erf_figure(
    results: Mapping[str, MapResult] | Sequence[MapResult],
    *,
    cmap: str = "inferno",
    log_scale: bool = False,
    title: str | None = None,
    ncols: int | None = None,
    panel_size: float = 3.2,
) -> Figure:
    """A grid of ERF maps, one panel per layer, for reports, docs and notebooks.

    Each 2-D panel shows the max-normalised map with a colourbar, the clipped TRF box (cyan)
    and the 95%-mass square (white, dashed), titled with the layer name, clipped TRF size,
    ERF size, ERF/TRF ratio and coverage. 1-D maps are drawn as curves, 3-D maps as the
    tiled max-projections of :func:`render_heatmap`.

    The figure is a plain ``matplotlib.figure.Figure`` (no pyplot state): save it with
    ``fig.savefig(path)``; notebooks display it when it is the cell's value.

    Args:
        results: ``compute_erf``'s result mapping, or a sequence of results.
        cmap: matplotlib colormap name.
        log_scale: log colour scale, see :func:`normalize`.
        title: optional figure title.
        ncols: panels per row (default: up to 4).
        panel_size: panel width in inches.

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: if ``results`` is empty.
    """
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    items = _as_list(results)
    if not items:
        raise ValueError("erf_figure needs at least one MapResult")
    n = len(items)
    ncols = max(1, min(ncols or 4, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(
        figsize=(panel_size * ncols * 1.15, panel_size * nrows * 1.05 + 0.4),
        dpi=100,
        layout="constrained",
    )
    axes = fig.subplots(nrows, ncols, squeeze=False)
    label = "ERF (log₁₀, normalised)" if log_scale else "ERF (normalised)"
    mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=matplotlib.colormaps[cmap])
    for ax, r in zip(axes.flat, items):
        a = _to_numpy(r.heatmap)
        ax.set_title(_panel_title(r), fontsize=8)
        if a.ndim == 1:
            _plot_1d(ax, a, r, cmap, log_scale, True, True)
            continue
        if a.ndim == 3:
            ax.imshow(render_map(r, cmap=cmap, log_scale=log_scale, min_size=0))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel("max-projections: yx | zx | zy", fontsize=7)
        elif a.ndim == 2:
            ax.imshow(
                normalize(a, log_scale),
                cmap=cmap,
                vmin=0.0,
                vmax=1.0,
                interpolation="nearest",
            )
            trf = (trf_interval(r, 0), trf_interval(r, 1))
            if trf[0] is not None and trf[1] is not None:
                for rows, cols in _boxes(r, (0, 1), trf[0], trf[1]):  # over the frame too
                    add_box(ax, rows, cols, "cyan", lw=1.2, label="TRF (clipped)",
                             zorder=3, clip_on=False)  # fmt: skip
            if a.max() > 0:
                square = (erf_interval(r, 0), erf_interval(r, 1))
                for rows, cols in _boxes(r, (0, 1), *square):
                    add_box(ax, rows, cols, "white", lw=1.2, ls="--", label="95% mass", zorder=4)
            if _off_centre(r, a.shape):
                cy, cx = r.centre_pixel
                ax.plot([cx], [cy], "+", color="lime", ms=9, mew=1.5, label="centre unit")
            ax.set_xlim(-0.5, a.shape[1] - 0.5)
            ax.set_ylim(a.shape[0] - 0.5, -0.5)
            ax.tick_params(labelsize=7)
        else:
            ax.text(0.5, 0.5, f"{a.ndim}-D map", ha="center", va="center")
            ax.set_axis_off()
            continue
        cbar = fig.colorbar(mappable, ax=ax, shrink=0.8)
        cbar.ax.tick_params(labelsize=7)
        cbar.set_label(label, fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    labels = {lab for ax in axes.flat for lab in ax.get_legend_handles_labels()[1]}
    proxies = _legend_proxies(labels, cmap)
    modes = [str(getattr(r, "mode", "")) for r in items]
    caption = colour_caption(modes, log_scale) + " Axes: input pixels."
    caption = textwrap.fill(caption, int(16 * panel_size * ncols * 1.15))
    if proxies:  # the caption heads the legend: one block under the panels
        fig.legend(
            [h for h, _ in proxies],
            [lab for _, lab in proxies],
            loc="outside lower center",
            ncols=len(proxies),
            fontsize=8,
            frameon=False,
            handlelength=3.0,  # swatches large enough to show the dashed outline
            handleheight=1.6,
            title=caption,
            title_fontsize=7,
        )
    else:
        fig.supxlabel(caption, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _legend_proxies(labels: set[str], cmap: str = "inferno") -> list[tuple[Any, str]]:
    """Legend swatches drawn as the boxes are (the white dashed square, the cyan box), on the
    colour map's low end, the background the boxes sit on in the panels."""
    import matplotlib
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ground = matplotlib.colormaps[cmap](0.0)
    # the dark ground reaches past the outline (a thick edge of its own colour), so that the
    # white dashes show on it and not on the figure's white
    back = Patch(facecolor=ground, edgecolor=ground, lw=5)
    known: dict[str, Any] = {
        "TRF (clipped)": (back, Patch(fill=False, edgecolor="cyan", lw=1.2)),
        "95% mass": (back, Patch(fill=False, edgecolor="white", lw=1.2, ls="--")),
        "centre unit": Line2D([], [], ls="", marker="+", color="lime", ms=9, mew=1.5),
    }
    names = {"95% mass": "95%-mass square", "centre unit": "centre unit (off the image centre)"}
    return [(h, names.get(lab, lab)) for lab, h in known.items() if lab in labels]


def save_png(image: np.ndarray, path: str | PathLike[str]) -> Path:
    """Write an ``(H, W, 3)`` uint8 RGB image (e.g. from :func:`render_heatmap`) as PNG.

    Uses PIL directly when it can be imported (it is a dependency of matplotlib >= 3.3),
    else ``matplotlib.image.imsave``. Parent directories are created.

    Args:
        image: ``(H, W, 3)`` or ``(H, W, 4)`` uint8 image, or ``(H, W)`` grayscale.
        path: destination file (``.png`` is not appended).

    Returns:
        The path written, as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.ascontiguousarray(image)
    if img.dtype != np.uint8:
        raise TypeError(f"save_png expects a uint8 image, got dtype {img.dtype}")
    try:
        from PIL import Image
    except ImportError:
        import matplotlib.image

        if img.ndim == 2:
            matplotlib.image.imsave(path, img, cmap="gray", vmin=0, vmax=255, format="png")
        else:
            matplotlib.image.imsave(path, img, format="png")
    else:
        Image.fromarray(img).save(path, format="PNG", optimize=False)
    return path
