"""The models x layers grid figure and figure files (PNG, PDF, SVG)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import erf_monitor as em
from erf_monitor.viz.export import save_figure
from erf_monitor.viz.grid import Panel, grid_figure


def gaussian(size: int, sigma: float, mass: float = 1.0) -> np.ndarray:
    y, x = np.mgrid[:size, :size] - size // 2
    g = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return mass * g / g.sum()


def shown(fig, row: int, col: int, ncols: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    ax = fig.axes[row * ncols + col]
    return np.asarray(ax.images[0].get_array(), dtype=float)


def test_rows_are_models_columns_layers_one_colour_bar() -> None:
    grid = {
        "narrow": {"a": Panel(gaussian(21, 1.5, 3.0)), "b": Panel(gaussian(21, 3.0, 3.0))},
        "wide": {"a": Panel(gaussian(21, 2.0, 0.5)), "b": Panel(gaussian(21, 5.0, 0.5))},
    }
    fig = grid_figure(grid)
    axes = fig.axes
    assert len(axes) == 4 + 1  # four panels and one colour bar for all of them
    assert [axes[j].get_title() for j in range(2)] == ["a", "b"]
    assert [axes[i * 2].get_ylabel() for i in range(2)] == ["narrow", "wide"]
    for i, model in enumerate(grid):
        for j, layer in enumerate(("a", "b")):
            m = grid[model][layer].heatmap
            np.testing.assert_allclose(shown(fig, i, j, 2), m / m.max())  # by its own peak


def test_mass_scale_shares_each_column() -> None:
    # Two maps of one column with different total masses and widths: on the mass scale the
    # more concentrated one is brighter, by the ratio of the unit-mass peaks.
    a, b = gaussian(21, 1.5, 7.0), gaussian(21, 3.0, 0.2)
    fig = grid_figure({"A": {"l": Panel(a)}, "B": {"l": Panel(b)}}, scale="mass")
    pa, pb = (a / a.sum()).max(), (b / b.sum()).max()
    np.testing.assert_allclose(shown(fig, 0, 0, 1), (a / a.sum()) / pa)
    np.testing.assert_allclose(shown(fig, 1, 0, 1), (b / b.sum()) / pa)
    assert shown(fig, 1, 0, 1).max() == pytest.approx(pb / pa)


def test_log_scale_is_three_decades() -> None:
    m = np.zeros((5, 5))
    m[2, 2], m[2, 3] = 1.0, 1e-3
    fig = grid_figure({"m": {"l": Panel(m)}}, log_scale=True)
    v = shown(fig, 0, 0, 1)
    assert v[2, 2] == pytest.approx(1.0)
    assert v[2, 3] == pytest.approx(math.log10(2) / math.log10(1001))  # log10(1 + 1e-3 * 1e3)


def test_columns_by_stage_line_models_up() -> None:
    # Different layer names: columns are output grids (largest first); a model without a
    # layer at some grid leaves that cell empty, and each cell names its layer.
    grid = {
        "cnn": {
            "s1": Panel(gaussian(32, 2), "s1", (16, 16), 9, (16, 16)),
            "s2": Panel(gaussian(32, 4), "s2", (8, 8), 17, (16, 16)),
        },
        "vit": {"blocks": Panel(gaussian(32, 6), "blocks", (8, 8), 25, (16, 16))},
    }
    fig = grid_figure(grid)
    assert [fig.axes[j].get_title() for j in range(2)] == ["16×16 (1/2)", "8×8 (1/4)"]
    assert len(fig.axes[2].images) == 0  # vit has no 16 x 16 stage
    assert fig.axes[3].get_xlabel() == "blocks · ERF 25 px"
    assert fig.axes[1].get_xlabel() == "s2 · ERF 17 px"


def test_results_draw_their_95_mass_square() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 5, padding=2))
    res = em.compute_erf(net, torch.randn(2, 1, 24, 24), ["0", "2"])
    fig = em.grid_figure({"net": res, "again": res})
    ax = fig.axes[1]
    (square,) = ax.patches
    r = res["2"]
    half = r.erf_size // 2
    cy, cx = r.centre_pixel
    assert square.get_xy() == (cx - half - 0.5, cy - half - 0.5)
    assert square.get_width() == r.erf_size and square.get_height() == r.erf_size


def test_only_2d_maps() -> None:
    with pytest.raises(ValueError, match="2-D"):
        grid_figure({"m": {"l": Panel(np.ones(5))}})
    with pytest.raises(ValueError, match="at least one"):
        grid_figure({})


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
def test_figure_files_parse_and_do_not_change(tmp_path: Path, fmt: str) -> None:
    def fig():  # type: ignore[no-untyped-def]
        return grid_figure({"m": {"l": Panel(gaussian(9, 1.0))}}, title="a & b < c")

    first = save_figure(fig(), tmp_path / "one" / f"grid.{fmt}").read_bytes()
    again = save_figure(fig(), tmp_path / f"again.{fmt}").read_bytes()
    if fmt == "png":
        assert first.startswith(b"\x89PNG\r\n\x1a\n")
    elif fmt == "pdf":
        assert first.startswith(b"%PDF-") and first.rstrip().endswith(b"%%EOF")
        assert first == again  # no creation date: the same figure, the same bytes at every run
    else:
        root = ET.fromstring(first)
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert root.findall(".//{http://www.w3.org/2000/svg}image")  # the map, embedded
        assert first == again


def test_unknown_format(tmp_path: Path) -> None:
    fig = grid_figure({"m": {"l": Panel(gaussian(9, 1.0))}})
    with pytest.raises(ValueError, match="png, pdf, svg"):
        save_figure(fig, tmp_path / "grid.eps")


def test_grid_explains_itself_legend_caption_mode_and_pixel_axes() -> None:
    p = Panel(gaussian(33, 3.0), layer="a", output_shape=(4, 4), erf_size=9,
              centre_pixel=(16, 16), mode="luo")  # fmt: skip
    fig = grid_figure({"m": {"a": p}})
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["square holding 95% of the ERF's mass"]
    caption = " ".join(legend.get_title().get_text().split())
    assert caption.startswith("Colour: how much each input pixel moves the layer's centre unit")
    assert "Mode luo: mean |gradient| over the probe images" in caption
    assert "Axes: input pixels" in caption
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [0, 20] and list(ax.get_yticks()) == [0, 20]
