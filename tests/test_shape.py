"""Shape diagnostics (issue 13): principal axes, anisotropy, cross score, dead pixels.

Every number is checked on a hand-made map whose answer is derived here, then end to end on
small linear networks whose ERF shape is known exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import erf_monitor as em
from erf_monitor.measure.shape import (
    anisotropy,
    coverage_within,
    cross_score,
    dead_fraction,
    gridding_period,
    principal_axes,
)


def points(shape: tuple[int, int], centre: tuple[int, int], masses: dict) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.float64)
    for (dy, dx), w in masses.items():
        m[centre[0] + dy, centre[1] + dx] += w
    return m


# ----------------------------------------------------------------------------- principal axes


def test_principal_axes_of_a_rotated_point_set() -> None:
    # Mass 4 at +-(1, 2) and 1 at +-(2, -1) (dy, dx): perpendicular directions u = (1, 2)/sqrt5
    # and v = (2, -1)/sqrt5. Covariance = (2*4*5 u u^T + 2*1*5 v v^T) / 10 = 4 u u^T + 1 v v^T:
    # widths 2 and 1, anisotropy 2, major axis along u: atan2(dy=1, dx=2) from +x towards +y.
    m = points((11, 11), (5, 5), {(1, 2): 4, (-1, -2): 4, (2, -1): 1, (-2, 1): 1})
    widths, angle = principal_axes(m)
    assert widths == pytest.approx((2.0, 1.0), rel=1e-12)
    assert anisotropy(widths) == pytest.approx(2.0, rel=1e-12)
    assert angle == pytest.approx(math.degrees(math.atan2(1, 2)), abs=1e-9)


@pytest.mark.parametrize(
    ("masses", "angle"),
    [
        ({(0, -3): 1, (0, 3): 1, (-1, 0): 1, (1, 0): 1}, 0.0),  # wide: along x
        ({(-3, 0): 1, (3, 0): 1, (0, -1): 1, (0, 1): 1}, 90.0),  # tall: along y
        ({(-2, 2): 1, (2, -2): 1}, -45.0),  # up and to the right
        ({(-2, -2): 1, (2, 2): 1}, 45.0),  # down and to the right
    ],
)
def test_axis_angle_convention(masses: dict, angle: float) -> None:
    widths, got = principal_axes(points((9, 9), (4, 4), masses))
    assert got == pytest.approx(angle, abs=1e-9)
    assert widths[0] > widths[1]


def test_isotropic_lines_and_zero_maps() -> None:
    iso = points((7, 7), (3, 3), {(0, 2): 1, (0, -2): 1, (2, 0): 1, (-2, 0): 1})
    widths, angle = principal_axes(iso)
    assert widths == pytest.approx((math.sqrt(2), math.sqrt(2))) and angle == 0.0
    assert anisotropy(widths) == pytest.approx(1.0)
    line = torch.zeros(5, 9)
    line[2, 1:8] = 1.0
    assert anisotropy(principal_axes(line)[0]) == math.inf
    zero = principal_axes(torch.zeros(4, 4))
    assert all(math.isnan(w) for w in zero[0]) and math.isnan(zero[1])
    # 1-D: one axis, isotropic by definition; 3-D: widths of the 3 axes, no single angle.
    assert anisotropy(principal_axes(torch.tensor([0.0, 1.0, 1.0]))[0]) == 1.0
    cube = torch.zeros(5, 5, 5)
    cube[2, 2, 0] = cube[2, 2, 4] = cube[0, 2, 2] = cube[4, 2, 2] = 1.0
    widths3, angle3 = principal_axes(cube)
    assert widths3 == pytest.approx((math.sqrt(2), math.sqrt(2), 0.0), abs=1e-12)
    assert math.isnan(angle3)


# ----------------------------------------------------------------------------- cross score


def test_cross_score_known_answers() -> None:
    # A "+" of any arm width: no mass off the axes at all (kappa = 1 exactly).
    for width in (1, 3):
        plus = torch.zeros(15, 15)
        lo, hi = 7 - width // 2, 7 + width // 2 + 1
        plus[lo:hi, 1:14] = 1.0
        plus[1:14, lo:hi] = 1.0
        assert cross_score(plus, (7, 7)) == 1.0, width
    # Separable maps (a Gaussian, a box) have exactly the off-axis mass their marginals imply.
    axis = torch.arange(15, dtype=torch.float64)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    gauss = torch.exp(-0.5 * (((y - 7) / 2) ** 2 + ((x - 6) / 3) ** 2))
    assert cross_score(gauss, (7, 6)) == pytest.approx(0.0, abs=1e-12)
    box = torch.zeros(9, 9)
    box[2:7, 1:8] = 1.0
    assert cross_score(box, (4, 4)) == pytest.approx(0.0, abs=1e-12)
    # An "x" of arms L: every pixel has d_y = d_x = k, with P(0) = 1/(4L+1), P(k) = 4/(4L+1).
    # The median h is the smallest with (1 + 4h)/(4L+1) >= 1/2; a pixel is off the axes iff
    # k > h, so E(O) = q = P(k > h), E0(O) = q^2 and kappa = 1 - 1/q.
    for arm in (3, 6):
        ex = torch.zeros(2 * arm + 1, 2 * arm + 1)
        for i in range(-arm, arm + 1):
            ex[arm + i, arm + i] = ex[arm + i, arm - i] = 1.0
        h = next(h for h in range(arm + 1) if (1 + 4 * h) / (4 * arm + 1) >= 0.5)
        q = 4 * (arm - h) / (4 * arm + 1)
        assert cross_score(ex, (arm, arm)) == pytest.approx(1 - 1 / q, rel=1e-12)
    # Nothing can be off the axes: a single line, a point; a zero map is undefined.
    line = torch.zeros(5, 5)
    line[2] = 1.0
    assert cross_score(line, (2, 2)) == 0.0
    assert cross_score(torch.eye(1), (0, 0)) == 0.0
    assert math.isnan(cross_score(torch.zeros(3, 3), (1, 1)))
    # 3-D: the three axis lines through the centre.
    cube = torch.zeros(7, 7, 7)
    cube[3, 3, :] = cube[3, :, 3] = cube[:, 3, 3] = 1.0
    assert cross_score(cube, (3, 3, 3)) == 1.0


def test_an_axial_network_has_a_cross_shaped_erf() -> None:
    class Axial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.row = nn.Conv2d(1, 1, (1, 9), padding=(0, 4), bias=False)
            self.col = nn.Conv2d(1, 1, (9, 1), padding=(4, 0), bias=False)
            nn.init.ones_(self.row.weight)
            nn.init.ones_(self.col.weight)
            self.out = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.row(x) + self.col(x))

    r = em.compute_erf(Axial(), torch.randn(2, 1, 21, 21), ["out"])["out"]
    assert r.cross_score == pytest.approx(1.0, abs=1e-9)
    assert r.scalars()["cross_score"] == pytest.approx(1.0, abs=1e-9)
    assert r.anisotropy == pytest.approx(1.0)  # symmetric: the two arms are equal


# ----------------------------------------------------------------------------- dead pixels


def test_dead_fraction_and_gridding_period_of_hand_made_maps() -> None:
    m = torch.zeros(12, 12)
    m[1:10:3, 2:11:2] = 1.0  # rows 1, 4, 7; cols 2, 4, 6, 8, 10
    box = ((1, 7), (2, 10))  # 7 x 9 = 63 pixels, 15 alive
    assert dead_fraction(m, box) == pytest.approx(48 / 63)
    assert gridding_period(m, box) == (3, 2)
    full = torch.ones(4, 4)
    assert dead_fraction(full, ((0, 3), (0, 3))) == 0.0 and gridding_period(
        full, ((0, 3),) * 2
    ) == (
        1,
        1,
    )
    assert dead_fraction(m, ((0, 20), (0, 20))) == pytest.approx(1 - 15 / 144)  # clipped to map
    bands = torch.zeros(3, 20)
    bands[:, [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]] = 1.0  # 4 live, 4 dead, ...
    assert gridding_period(bands, ((0, 2), (0, 19))) == (1, 8)
    irregular = torch.zeros(1, 7)
    irregular[0, [0, 1, 3]] = 1.0  # no period up to half the box
    assert gridding_period(irregular, ((0, 0), (0, 6))) == (1, 1)


def dilated(layers: list[tuple[int, int]]) -> nn.Sequential:
    """All-ones 3x3 convolutions ``(kernel, dilation)``, zero padding keeping the size."""
    convs = [nn.Conv2d(1, 1, k, padding=d * (k // 2), dilation=d, bias=False) for k, d in layers]
    for c in convs:
        nn.init.ones_(c.weight)
    return nn.Sequential(*convs)


def test_gridding_of_a_dilated_stack() -> None:
    # Two 3x3 convolutions of dilation 2: taps at even offsets -4..4, a 9 x 9 TRF with 5 x 5
    # live pixels: 56/81 dead, period 2 on both axes.
    x = torch.randn(1, 1, 21, 21)
    r = em.compute_erf(dilated([(3, 2), (3, 2)]), x, ["1"])["1"]
    assert r.trf is not None and r.trf.clipped_size == (9, 9)
    assert r.dead_fraction == pytest.approx(56 / 81)
    assert r.gridding_period == (2, 2)
    s = r.scalars()
    assert s["dead_fraction"] == pytest.approx(56 / 81) and s["gridding_period_x"] == 2.0
    # A dense 3x3 after them fills the holes: offsets -5..5 all reachable.
    r2 = em.compute_erf(dilated([(3, 2), (3, 2), (3, 1)]), x, ["2"])["2"]
    assert r2.dead_fraction == 0.0 and r2.gridding_period == (1, 1)
    # No TRF: no box to count in.
    skip = em.compute_erf(dilated([(3, 2), (3, 2)]), x, ["1"], trf="skip")["1"]
    assert math.isnan(skip.dead_fraction) and math.isnan(skip.coverage_trf)


# ----------------------------------------------------------------------------- coverage of TRF


def test_coverage_within_the_clipped_trf() -> None:
    m = torch.zeros(10, 10)
    m[0:3, 0:3] = 1.0
    # 90% square around (1, 1): radius 1 (9 of 9 pixels), inside a 6 x 6 box: 9/36.
    assert coverage_within(m, 0.9, (1, 1), ((0, 5), (0, 5))) == 0.25
    # Around the corner (0, 0) the square needs radius 2: rows/cols -2..2, 3 x 3 inside.
    assert coverage_within(m, 0.9, (0, 0), ((0, 2), (0, 2))) == 1.0
    assert coverage_within(torch.zeros(4, 4), 0.9, (1, 1), ((0, 3), (0, 3))) == 0.0


def test_scalars_expose_the_diagnostics_per_dimension() -> None:
    conv1 = nn.Sequential(nn.Conv1d(1, 1, 3, padding=1))
    r1 = em.compute_erf(conv1, torch.randn(2, 1, 16), ["0"])["0"]
    s1 = r1.scalars()
    assert "axis_angle" not in s1 and "cross_score" not in s1 and s1["anisotropy"] == 1.0
    conv2 = dilated([(3, 1)])
    s2 = em.compute_erf(conv2, torch.randn(1, 1, 9, 9), ["0"])["0"].scalars()
    for key in ("sigma_major", "sigma_minor", "anisotropy", "axis_angle", "cross_score",
                "dead_fraction", "gridding_period_y", "gridding_period_x", "coverage_trf",
                "erf_size_visible"):  # fmt: skip
        assert key in s2, key
    assert s2["erf_size_visible"] == s2["erf_size"] == 3.0 and s2["coverage_trf"] == 1.0
    conv3 = nn.Sequential(nn.Conv3d(1, 1, 3, padding=1))
    s3 = em.compute_erf(conv3, torch.randn(1, 1, 6, 6, 6), ["0"])["0"].scalars()
    assert "cross_score" in s3 and "axis_angle" not in s3 and "gridding_period_z" in s3
