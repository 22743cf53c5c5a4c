"""Fields that wrap around the input (circular padding): metrics on the torus.

A circularly padded network lives on a torus: the field of a border unit continues on the
opposite side of the image. Measured on the plane, its mass squares grow across the whole
image to reach the wrapped part (a 13 px field reported as 31 px, coverage 1.0). The known
answer used here: circular convolutions are exactly translation-equivariant on the torus, so
every unit's map is the centre unit's map rolled, and every relative metric (sizes, widths,
offsets, coverage) of every unit equals the centre unit's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import erf_monitor as em
from erf_monitor.measure import metrics as _metrics

H, W = 16, 20


def _circular_net(depth: int = 3, k: int = 5) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(2, 2, k, padding=k // 2, padding_mode="circular"), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).eval()


#: Metrics that do not depend on where the unit sits on a torus.
RELATIVE = ("erf_size", "coverage", "sigma_y", "sigma_x", "centroid_offset_y", "centroid_offset_x",
            "gaussian_r2", "area_t50", "erf_trf_ratio", "trf_size_clipped", "coverage_trf",
            "sigma_major", "anisotropy", "cross_score", "dead_fraction", "gauss_fit_sigma_x",
            "gauss_fit_offset_y", "disc_mass_r10")  # fmt: skip


@pytest.mark.parametrize("position", [(0, 0), (-1, -1), (3, 17), (15, 0)])
def test_every_unit_of_a_circular_net_measures_like_the_centre(position: tuple[int, int]) -> None:
    net = _circular_net()
    x = torch.randn(4, 2, H, W)
    iy, ix = position[0] % H, position[1] % W
    to_centre = (H // 2 - iy, W // 2 - ix)
    # the centre unit on the input rolled so that the unit's pixel comes to the middle
    centre = em.compute_erf(net, torch.roll(x, to_centre, (2, 3)), ["4"])["4"]
    unit = em.compute_erf(net, x, ["4"], position=position)["4"]
    shifted = torch.roll(centre.heatmap, (-to_centre[0], -to_centre[1]), (0, 1))
    torch.testing.assert_close(unit.heatmap, shifted, rtol=1e-4, atol=1e-6)  # equivariance
    assert not any(centre.wrapped) and all(unit.wrapped) == (position != (H // 2, W // 2))
    assert unit.centre_pixel == (iy, ix)
    a, b = centre.scalars(), unit.scalars()
    for key in RELATIVE:
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert centre.erf_size == 13 and centre.trf is not None and centre.trf.size == (13.0, 13.0)
    # positions are taken modulo the input: the centroid sits where the map's mass is
    for d, (n, i) in enumerate(zip((H, W), (iy, ix))):
        assert unit.theoretical_centre[d] == i
        expect = (i + centre.centroid_offset[d]) % n
        assert unit.centroid[d] == pytest.approx(expect, abs=1e-4)


def test_an_asymmetric_circular_pad_puts_the_field_on_the_other_side() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, bias=False)
            nn.init.ones_(self.conv.weight)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(F.pad(x, (4, 0, 0, 0), mode="circular"))

    r = em.compute_erf(Net().eval(), torch.rand(2, 1, H, W), ["conv"], position=(0, 0))["conv"]
    # output unit (0, 0) reads rows 0..2 and padded columns 0..2 = columns -4..-2 = 16..18
    expect = torch.zeros(H, W)
    expect[0:3, 16:19] = 1.0
    torch.testing.assert_close(r.heatmap, expect)
    assert r.wrapped == (False, True) and r.centre_pixel == (1, 17)
    assert r.erf_size == 3 and r.coverage == pytest.approx(9 / (H * W))
    assert r.centroid_offset == pytest.approx((0.0, 0.0), abs=1e-9)
    assert r.ratio == pytest.approx(1.0) and r.coverage_trf == pytest.approx(1.0)


def test_a_field_wider_than_the_input_at_the_centre_is_measured_on_the_plane() -> None:
    """The centre unit's frame is the image itself: numbers as on the plane."""
    net = _circular_net(depth=5, k=7)  # TRF 31 > 16, 20: the field wraps onto itself
    r = em.compute_erf(net, torch.randn(4, 2, H, W), ["8"])["8"]
    assert r.wrapped == (True, True) and r.centre_pixel == (H // 2, W // 2)
    assert r.erf_size == _metrics.mass_extent(r.heatmap, 0.95, r.centre_pixel)
    assert r.sigma == pytest.approx(_metrics.sigma(r.heatmap))
    assert r.centroid == pytest.approx(_metrics.centroid(r.heatmap))
    assert r.trf is not None and r.scalars()["trf_size_clipped"] == W


def test_reflect_padding_does_not_wrap() -> None:
    net = nn.Sequential(*[nn.Conv2d(1, 1, 5, padding=2, padding_mode="reflect") for _ in range(3)])
    r = em.compute_erf(net.eval(), torch.randn(2, 1, H, W), ["2"], position=(0, 0))["2"]
    assert r.wrapped == (False, False) and r.centre_pixel == (0, 0)
    assert r.trf is not None and math.isfinite(r.ratio)


def test_a_wrapping_square_is_drawn_in_its_pieces_without_the_cut_edges() -> None:
    from erf_monitor.viz.render import ERF_COLOR, render_map

    net = _circular_net()
    r = em.compute_erf(net, torch.randn(2, 2, 32, 40), ["4"], position=(0, 0))["4"]
    assert r.erf_size == 13  # rows and columns -6..6: 0..6 and 26..31 / 34..39
    img = render_map(r, draw_trf=False, min_size=0)
    assert img.shape[:2] == (32, 40)
    edge = (img == np.array(ERF_COLOR, dtype=img.dtype)).all(-1)
    # the square is dashed (3 px dashes counted from its own corner at -6, the far corner
    # drawn): pixels 0..6 of each edge piece are on, on, on, off, off, off, on
    dashed = [True, True, True, False, False, False, True]
    assert edge[6, 0:7].tolist() == dashed and edge[26, 0:7].tolist() == dashed  # bottom / top
    assert edge[0:7, 6].tolist() == dashed and edge[0:7, 34].tolist() == dashed  # right / left
    assert not edge[0, 1:6].any() and not edge[1:6, 0].any()  # the border cuts: no edge
    assert not edge[7:26, :].any()  # nothing between the pieces
