"""Rendering: colormaps, box placement, 1-D/2-D/3-D maps, figures and PNG files."""

from __future__ import annotations

import io

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch

from erf_monitor.measure.result import ERFResult
from erf_monitor.trf.types import TRF
from erf_monitor.viz.render import (
    CENTRE_COLOR,
    ERF_COLOR,
    TRF_COLOR,
    colorize,
    erf_figure,
    normalize,
    render_heatmap,
    render_map,
    save_png,
)


def _trf(clipped: tuple[tuple[int, int], ...], shape: tuple[int, ...]) -> TRF:
    nd = len(shape)
    return TRF(
        size=tuple(float(e - s + 1) for s, e in clipped),
        stride=(1.0,) * nd,
        interval=tuple((float(s), float(e)) for s, e in clipped),
        clipped=clipped,
        global_dims=(False,) * nd,
        centre=tuple((s + e) / 2 for s, e in clipped),
        output_centre=tuple(x // 2 for x in shape),
        output_shape=shape,
        input_shape=shape,
        method="fx",
    )


def _result(
    heatmap: torch.Tensor,
    clipped: tuple[tuple[int, int], ...] | None,
    centre: tuple[int, ...],
    name: str = "layer",
) -> ERFResult:
    shape = tuple(heatmap.shape)
    return ERFResult(
        name=name,
        heatmap=heatmap.float(),
        trf=None if clipped is None else _trf(clipped, shape),
        mode="luo",
        num_samples=1,
        output_shape=shape,
        centre_pixel=centre,
    )


def _block_map(shape: tuple[int, ...], centre: tuple[int, ...], half: int) -> torch.Tensor:
    """Uniform mass on the (2*half+1)-cube around ``centre``: its 95%-mass side is 2*half+1."""
    h = torch.zeros(shape)
    h[tuple(slice(c - half, c + half + 1) for c in centre)] = 1.0
    return h


def _gauss(shape: tuple[int, ...], sigma: float) -> torch.Tensor:
    grids = torch.meshgrid(
        *[torch.arange(s, dtype=torch.float32) - s // 2 for s in shape], indexing="ij"
    )
    return torch.exp(-sum(g**2 for g in grids) / (2 * sigma**2))


def _is(img: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return (img == np.array(color, dtype=np.uint8)).all(-1)


# -- colorize / normalize ------------------------------------------------------------------
def test_colorize_uses_matplotlib_colormap_end_points() -> None:
    cmap = matplotlib.colormaps["viridis"]
    img = colorize(np.array([[0.0, 2.0], [1.0, 0.5]]), cmap="viridis")
    assert img.shape == (2, 2, 3) and img.dtype == np.uint8
    bottom = np.round(np.array(cmap(0.0)[:3]) * 255).astype(np.uint8)
    top = np.round(np.array(cmap(1.0)[:3]) * 255).astype(np.uint8)
    np.testing.assert_array_equal(img[0, 0], bottom)
    np.testing.assert_array_equal(img[0, 1], top)  # normalised by the max
    mid = np.round(np.array(cmap(128 / 255)[:3]) * 255).astype(np.uint8)
    np.testing.assert_array_equal(img[1, 0], mid)  # 0.5 of max -> LUT index 128


def test_colorize_zero_nan_negative_map_is_bottom_colour() -> None:
    bottom = colorize(np.zeros((1, 1)))[0, 0]
    for a in (np.zeros((4, 5)), np.full((3, 3), np.nan), -np.ones((2, 2))):
        img = colorize(a)
        assert (img == bottom).all()
    img = colorize(torch.tensor([[np.nan, 1.0], [np.inf, -3.0]]))
    assert (img[0, 0] == bottom).all() and (img[1, 1] == bottom).all()
    assert not (img[0, 1] == bottom).all()


def test_log_scale_formula_and_range() -> None:
    v = normalize(np.array([0.0, 1e-3, 1.0, 2.0]), log_scale=True)
    expected = np.log10(1 + np.array([0.0, 0.5e-3, 0.5, 1.0]) / 1e-3) / np.log10(1 + 1e3)
    np.testing.assert_allclose(v, expected)
    assert v.min() >= 0 and v.max() == pytest.approx(1.0)
    # faint tails become visible: 1e-3 of the peak is ~10% of the colour range
    tail = colorize(np.array([[1.0, 1e-3]]), log_scale=True)
    assert not (tail[0, 1] == colorize(np.zeros((1, 1)))[0, 0]).all()


def test_colorize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        colorize(np.zeros(5))
    with pytest.raises(ValueError, match="Unknown colormap"):
        colorize(np.zeros((2, 2)), cmap="not-a-cmap")


# -- 2-D boxes ------------------------------------------------------------------------------
def test_boxes_at_known_pixels_without_upscaling() -> None:
    shape, centre = (20, 24), (10, 12)
    r = _result(_block_map(shape, centre, 2), ((3, 14), (5, 16)), centre)
    assert r.erf_size == 5  # uniform 5x5 block: the first square holding > 95% is 5x5
    img = render_map(r, min_size=0)
    assert img.shape == (20, 24, 3) and img.dtype == np.uint8
    trf = _is(img, TRF_COLOR)
    # the TRF outline is on the border pixels of rows 3..14, cols 5..16 (1 px, small image)
    assert trf[3, 5:17].all() and trf[14, 5:17].all()
    assert trf[3:15, 5].all() and trf[3:15, 16].all()
    assert not trf[2].any() and not trf[15].any() and not trf[:, 4].any()
    assert not trf[4:14, 6:16].any()  # nothing inside
    erf = _is(img, ERF_COLOR)
    rows, cols = np.nonzero(erf)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8, 12, 10, 14)
    # dashed (3 px dashes from each edge's start, corners always drawn), so that a TRF box
    # on the same pixels stays visible between the dashes
    dashed = [True, True, True, False, True]
    assert erf[8, 10:15].tolist() == dashed and erf[12, 10:15].tolist() == dashed
    assert erf[8:13, 10].tolist() == dashed and erf[8:13, 14].tolist() == dashed
    assert not erf[9:12, 11:14].any()  # outline only


def test_boxes_scale_with_integer_upscaling() -> None:
    shape, centre = (20, 20), (10, 10)
    r = _result(_block_map(shape, centre, 2), ((3, 14), (5, 16)), centre)
    img = render_map(r, min_size=40)  # factor 2 -> 40x40, 1 px lines
    assert img.shape == (40, 40, 3)
    trf = _is(img, TRF_COLOR)
    rows, cols = np.nonzero(trf)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (6, 29, 10, 33)
    # nearest upscaling: every input pixel is a crisp 2x2 block
    plain = render_map(r, min_size=40, draw_trf=False, draw_extent=False)
    np.testing.assert_array_equal(plain, np.repeat(np.repeat(colorize(r.heatmap), 2, 0), 2, 1))


def test_default_size_and_thick_lines() -> None:
    centre = (16, 16)
    r = _result(_gauss((32, 32), 3.0), ((6, 26), (6, 26)), centre)
    img = render_map(r)
    assert img.shape == (256, 256, 3)  # 32 * 8
    trf = _is(img, TRF_COLOR)
    assert trf[48:50, 60].all() and not trf[50, 60]  # 2 px top edge of row 6 (y 48..55)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20


def test_erf_box_partly_outside_draws_only_visible_edges() -> None:
    # centre near the top-left corner: the ERF square's top/left edges fall outside
    r = _result(_block_map((16, 16), (2, 2), 2), None, (1, 1))
    img = render_map(r, min_size=0)
    erf = _is(img, ERF_COLOR)
    half = r.erf_size // 2
    assert half >= 2
    assert not erf[0, :].all()  # no fake edge along the image border
    bottom, right = erf[1 + half, : 2 + half], erf[: 2 + half, 1 + half]  # dashed edges
    assert bottom.mean() >= 0.4 and right.mean() >= 0.4 and erf[1 + half, 1 + half]


def test_zero_map_renders_bottom_colour_and_trf_only() -> None:
    r = _result(torch.zeros(12, 12), ((2, 9), (2, 9)), (6, 6))
    img = render_map(r, min_size=0)
    bottom = colorize(np.zeros((1, 1)))[0, 0]
    trf = _is(img, TRF_COLOR)
    assert trf.sum() == 4 * 8 - 4
    assert (img[~trf] == bottom).all()  # no ERF box, no NaN garbage


def test_render_without_trf() -> None:
    r = _result(_gauss((24, 24), 2.0), None, (12, 12))
    img = render_map(r, min_size=0)
    assert not _is(img, TRF_COLOR).any() and _is(img, ERF_COLOR).any()


def test_render_224_frames_the_doubled_map() -> None:
    # Not timed (no test depends on the machine's speed); the cost is a benchmark's business.
    r = _result(_gauss((224, 224), 20.0), ((0, 223), (0, 223)), (112, 112))
    metrics = r.scalars()  # what log_results passes: the picture does not recompute them
    img = render_heatmap(r, step=1, metrics=metrics)
    assert render_map(r).shape == (448, 448, 3)
    assert img.shape[0] > 448 and img.shape[1] > 448


def _find(img: np.ndarray, core: np.ndarray) -> tuple[int, int]:
    """Where ``core`` sits inside ``img`` (top-left corner), found by its first row."""
    h, w = core.shape[:2]
    for y in range(img.shape[0] - h + 1):
        for x in range(img.shape[1] - w + 1):
            if (img[y, x : x + w] == core[0]).all() and (img[y : y + h, x : x + w] == core).all():
                return y, x
    raise AssertionError("the map is not in the picture")


def test_annotated_picture_frames_the_exact_map() -> None:
    r = _result(_gauss((32, 32), 3.0), ((6, 26), (6, 26)), (16, 16), name="layer3")
    bare = render_map(r)
    img = render_heatmap(r, step=7)
    y, x = _find(img, bare)  # the map itself is unchanged (centre unit at the image centre)
    assert y > 30 and x < 40  # below a title, left-aligned after the pixel axis labels
    # right of the map: a colour bar running from the colormap's top to its bottom colour
    bar = img[y : y + bare.shape[0], x + bare.shape[1] + 10]
    top, bottom = colorize(np.array([[1.0, 0.0]]))[0]
    assert (bar[0] == top).all() and (bar[-1] == bottom).all()
    assert len(np.unique(bar, axis=0)) > 100
    below = img[y + bare.shape[0] :]  # the legend repeats both box colours, no centre cross
    assert _is(below, TRF_COLOR).any() and _is(below, ERF_COLOR).any()
    assert not _is(img, CENTRE_COLOR).any()
    log = render_heatmap(r, step=7, log_scale=True)
    assert log.shape == img.shape and (log != img).any()


def test_off_centre_unit_is_marked() -> None:
    # the centre unit sees input pixel (11, 13) of a 32x32 input (image centre: 16, 16)
    r = _result(_block_map((32, 32), (11, 13), 2), ((5, 17), (7, 19)), (11, 13))
    img = render_heatmap(r, step=0)
    cross = _is(img, CENTRE_COLOR)
    assert cross.any()
    f = render_map(r).shape[0] // 32  # upscaling factor (8)
    y, x = np.argwhere(_is(img, TRF_COLOR))[0]  # the TRF box's top-left corner: (5, 7) * f
    y0, x0 = y - 5 * f, x - 7 * f  # the map's top-left corner in the picture
    rows, cols = np.nonzero(cross[y0 : y0 + 32 * f, x0 : x0 + 32 * f])
    assert abs(np.median(rows) - (11 * f + f // 2)) <= 1
    assert abs(np.median(cols) - (13 * f + f // 2)) <= 1
    assert cross[y0 + 32 * f :].any()  # and its legend entry below the map


# -- 1-D and 3-D ----------------------------------------------------------------------------
def test_render_1d_curve() -> None:
    r = _result(_gauss((64,), 4.0), ((22, 42),), (32,))
    img = render_heatmap(r, min_size=200)
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
    assert img.shape[0] >= 200 and img.shape[1] > img.shape[0]
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 10
    no_trf = render_heatmap(r, min_size=200, draw_trf=False)
    assert no_trf.shape == img.shape and (no_trf != img).any()  # the shaded interval
    zero = render_heatmap(_result(torch.zeros(10), None, (5,)), min_size=100)
    assert zero.dtype == np.uint8


def test_render_3d_max_projections_tiled() -> None:
    shape, centre = (4, 6, 8), (2, 3, 4)
    h = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    r = _result(h, ((1, 2), (1, 4), (2, 5)), centre)
    img = render_map(r, min_size=0, draw_trf=False, draw_extent=False)
    gap = 2
    assert img.shape == (6, 8 + gap + 8 + gap + 6, 3)
    # projections share the global max, so each tile is colorize(max-projection / global max)
    peak = h.max()
    tiles = [h.amax(0), h.amax(1), h.amax(2)]
    x = 0
    for t in tiles:
        t_img = colorize(torch.cat([t.flatten(), peak.view(1)]).view(1, -1))[0, :-1]
        np.testing.assert_array_equal(img[: t.shape[0], x : x + t.shape[1]].reshape(-1, 3), t_img)
        x += t.shape[1] + gap
    boxed = render_map(r, min_size=0)
    trf = _is(boxed, TRF_COLOR)
    assert trf[1, 2:6].all()  # yx tile: rows 1..4, cols 2..5
    assert trf[1, 8 + gap + 2 : 8 + gap + 6].all()  # zx tile: rows (z) 1..2, cols 2..5


def test_render_rejects_4d() -> None:
    r = _result(torch.ones(2, 2, 2, 2), None, (1, 1, 1, 1), name="vol4")
    with pytest.raises(ValueError, match="vol4"):
        render_heatmap(r)


# -- figure and files -----------------------------------------------------------------------
def test_erf_figure_legend_swatches_look_like_the_boxes() -> None:
    """Each legend swatch has its box's edge colour and line style (the 95%-mass square is
    white and dashed, so is its swatch), on the colour map's background."""
    import matplotlib
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Rectangle

    from erf_monitor.viz.render import _legend_proxies

    r = _result(_gauss((32, 32), 3.0), ((8, 24), (8, 24)), (16, 16), "layer1.0")
    fig = erf_figure({"layer1.0": r}, cmap="viridis")
    boxes = {p.get_label(): p for p in fig.axes[0].patches if isinstance(p, Rectangle)}
    assert set(boxes) == {"TRF (clipped)", "95% mass"}
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["TRF (clipped)", "95%-mass square"]
    swatches = {name: h for h, name in _legend_proxies(set(boxes), "viridis")}
    for box_label, legend_label in zip(["TRF (clipped)", "95% mass"], texts):
        (ground, outline), box = swatches[legend_label], boxes[box_label]
        assert outline.get_edgecolor() == box.get_edgecolor(), legend_label
        assert outline.get_linestyle() == box.get_linestyle(), legend_label
        assert not outline.get_fill() and not box.get_fill()
        assert ground.get_facecolor() == to_rgba(matplotlib.colormaps["viridis"](0.0))
    assert boxes["95% mass"].get_linestyle() == "--"  # what the swatch must copy


def test_erf_figure_panels_and_titles() -> None:
    results = {
        "layer1.0": _result(_gauss((32, 32), 3.0), ((8, 24), (8, 24)), (16, 16), "layer1.0"),
        "line": _result(_gauss((40,), 3.0), ((10, 30),), (20,), "line"),
        "vol": _result(_gauss((8, 10, 12), 2.0), None, (4, 5, 6), "vol"),
    }
    fig = erf_figure(results, title="resnet", log_scale=True)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 3
    assert titles[0].startswith("layer1.0\nTRF 17×17 · ERF ")
    assert "ratio" in titles[0] and "cov" in titles[0]
    assert "TRF ?" in titles[2] and "ratio n/a" in titles[2]
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"
    assert erf_figure(list(results.values()), ncols=1).axes
    with pytest.raises(ValueError, match="at least one"):
        erf_figure({})


def test_save_png_roundtrip(tmp_path) -> None:
    img = (np.arange(5 * 7 * 3) % 256).astype(np.uint8).reshape(5, 7, 3)
    path = save_png(img, tmp_path / "sub" / "x.png")
    assert path == tmp_path / "sub" / "x.png" and path.exists()
    back = matplotlib.image.imread(path)
    np.testing.assert_array_equal(np.round(back[..., :3] * 255).astype(np.uint8), img)
    with pytest.raises(TypeError, match="uint8"):
        save_png(img.astype(np.float32), tmp_path / "bad.png")


def test_coinciding_boxes_both_visible_and_pixel_axes() -> None:
    # the TRF box and the 95%-mass square on the same pixels: the dashed square leaves the
    # TRF box's colour between its dashes (it used to hide it)
    shape, centre = (20, 20), (10, 10)
    r = _result(_block_map(shape, centre, 2), ((8, 12), (8, 12)), centre)
    assert r.erf_size == 5
    img = render_map(r, min_size=0)
    edge = img[8, 8:13]
    assert _is(edge[None], TRF_COLOR).any() and _is(edge[None], ERF_COLOR).any()
    pic = render_heatmap(r, step=3)
    bare = render_map(r)
    y, x = _find(pic, bare)
    assert x > 12  # room for the y tick labels left of the map
    below = pic[y + bare.shape[0] : y + bare.shape[0] + 14, x : x + bare.shape[1]]
    assert (below.astype(int).sum(-1) > 300).any()  # x tick labels under the map


def test_erf_figure_caption_names_colour_and_mode() -> None:
    r = _result(_gauss((24, 24), 2.0), ((4, 19), (4, 19)), (12, 12))
    fig = erf_figure([r])
    (legend,) = fig.legends
    caption = " ".join(legend.get_title().get_text().split())
    assert caption.startswith("Colour: how much each input pixel moves")
    assert "Mode luo" in caption
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["TRF (clipped)", "95%-mass square"]


def test_square_wider_than_the_image_is_said_in_the_legend() -> None:
    from erf_monitor.viz.render import _square_label

    # an odd 5 px square around pixel (2, 2) of a 4 x 4 map: its edges lie outside the image
    r = _result(torch.ones(4, 4), ((0, 3), (0, 3)), (2, 2))
    assert r.erf_size == 5
    assert _square_label(r, (4, 4)) == "95%-mass square, side 5 px, wider than the image"
    assert _square_label(r, (5, 5)) == "95%-mass square, side 5 px"
    assert render_heatmap(r).shape[2] == 3
