"""Tests for the pure ERF-map metrics (DESIGN §2).

Every expected number is derived here independently: counted by hand, computed by plain loops
written here from the definitions (RepLKNet's published square rule and our growing cube), or
from closed forms (the variance of an n-fold box convolution is ``n (k^2 - 1) / 12``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from erf_monitor.measure.metrics import (
    COVERAGE_MASS,
    area_ratio,
    centroid,
    coverage,
    erf_size,
    gaussian_r2,
    mass_extent,
    mass_extent_per_axis,
    replknet_normalise,
    sigma,
)

# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------


def published_square(data: np.ndarray, t: float) -> tuple[int, float] | None:
    """RepLKNet's area-ratio rule as its paper and ``analyze_erf.py`` describe it (our own
    code): squares centred on the middle pixel ``(h // 2, w // 2)`` with odd sides 3, 5, 7, ...
    as long as they stay strictly inside the map (radius up to ``h // 2 - 1``); the first whose
    mass fraction exceeds ``t`` gives ``(side, side**2 / (h * w))``; ``None`` if none does."""
    height, width = data.shape
    middle_row, middle_col = height // 2, width // 2
    total = float(data.sum())
    for radius in range(1, height // 2):
        block = data[
            middle_row - radius : middle_row + radius + 1,
            middle_col - radius : middle_col + radius + 1,
        ]
        if float(block.sum()) / total > t:
            side = 2 * radius + 1
            return side, side * side / (height * width)
    return None


def growing_cube(data: np.ndarray, t: float, centre: tuple[int, ...]) -> tuple[int, int]:
    """Our definition written out plainly: cubes of radius 0, 1, 2, ... around ``centre`` in any
    number of dims, cut to the map, until one holds more than ``t`` of the mass or covers the
    whole map. Returns (uncut side, number of map pixels inside); (0, 0) for a zero map."""
    total = float(data.sum())
    if total == 0.0:
        return 0, 0
    radius = 0
    while True:
        bounds = [(max(c - radius, 0), min(c + radius, n - 1)) for c, n in zip(centre, data.shape)]
        block = data[tuple(slice(lo, hi + 1) for lo, hi in bounds)]
        whole = all(lo == 0 and hi == n - 1 for (lo, hi), n in zip(bounds, data.shape))
        if float(block.sum()) / total > t or whole:
            return 2 * radius + 1, block.size
        radius += 1


def box_power(k: int, n: int, dilation: int = 1) -> np.ndarray:
    """n-fold convolution of a width-k all-ones box (taps ``dilation`` apart)."""
    kernel = np.zeros(dilation * (k - 1) + 1)
    kernel[::dilation] = 1.0
    out = np.ones(1)
    for _ in range(n):
        out = np.convolve(out, kernel)
    return out


def outer(*profiles: np.ndarray) -> np.ndarray:
    out = profiles[0]
    for p in profiles[1:]:
        out = np.multiply.outer(out, p)
    return out


def sampled_gaussian(shape: tuple[int, ...], mu: tuple[float, ...], sig: tuple[float, ...]):
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    expo = sum(((g - m) / s) ** 2 for g, m, s in zip(grids, mu, sig))
    return np.exp(-0.5 * expo)


# --------------------------------------------------------------------------------------------
# Mass extent, area ratio, per-axis
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(9,), (9, 9), (5, 7, 9), (8, 8)])
def test_delta(shape: tuple[int, ...]) -> None:
    centre = tuple(s // 2 for s in shape)
    m = torch.zeros(shape)
    m[centre] = 2.5
    for t in (0.01, 0.5, 0.99):
        assert mass_extent(m, t, centre) == 1
        assert mass_extent_per_axis(m, t, centre) == (1,) * len(shape)
        assert area_ratio(m, t, centre) == pytest.approx(1 / math.prod(shape))
    assert sigma(m) == (0.0,) * len(shape)
    assert centroid(m) == tuple(float(c) for c in centre)
    assert gaussian_r2(m) == 1.0  # documented: the sigma -> 0 limit fits a delta exactly
    assert erf_size(m, centre) == 1
    assert coverage(m, centre) == pytest.approx(1 / math.prod(shape))


def test_uniform_square_inside_zero_map_counts() -> None:
    s = 7
    m = torch.zeros(21, 21)
    m[7:14, 7:14] = 1.0  # centre (10, 10), mass 49
    c = (10, 10)
    # Cube masses by counting: side 1 -> 1, 3 -> 9, 5 -> 25, 7 -> 49 (all of it).
    assert mass_extent(m, 0.5 / 49, c) == 1  # 1/49 > 0.5/49
    assert mass_extent(m, 1 / 49, c) == 3  # 1/49 is not *strictly* greater than 1/49
    assert mass_extent(m, 0.18, c) == 3  # 9/49 = 0.184
    assert mass_extent(m, 0.19, c) == 5
    assert mass_extent(m, 0.5, c) == 5  # 25/49 = 0.51
    assert mass_extent(m, 0.52, c) == 7
    assert mass_extent(m, 0.999, c) == 7
    assert area_ratio(m, 0.5, c) == pytest.approx(25 / 441)
    assert area_ratio(m, 0.99, c) == pytest.approx(49 / 441)
    # Marginal profiles are uniform over s = 7 indices: side w holds w / 7.
    assert mass_extent_per_axis(m, 0.5, c) == (5, 5)  # 5/7 > 0.5 > 3/7
    assert mass_extent_per_axis(m, 0.6, c) == (5, 5)  # while the 2-D square needs 7
    assert mass_extent(m, 0.6, c) == 7
    assert mass_extent_per_axis(m, 0.1, c) == (1, 1)  # 1/7 = 0.143
    assert mass_extent_per_axis(m, 5 / s, c) == (7, 7)  # tie is not enough


def test_exact_tie_is_not_enough() -> None:
    m = torch.ones(6, 6)  # integer-valued: every cube sum and fraction is exact
    assert mass_extent(m, 9 / 36, (3, 3)) == 5  # 9/36 == t exactly: not > t
    assert mass_extent(m, 9 / 36 - 1e-9, (3, 3)) == 3


def test_even_sized_uniform_map() -> None:
    # 6 x 6 ones, centre (3, 3) = lower-right of the four central pixels.
    # radius 0: 1; radius 1: rows/cols 2..4 -> 9; radius 2: 1..5 -> 25;
    # radius 3: 0..6 clipped to 0..5 -> 36 (covers the map, side 7 > 6).
    m = torch.ones(6, 6)
    c = (3, 3)
    assert mass_extent(m, 0.2, c) == 3  # 9/36 = 0.25
    assert mass_extent(m, 0.5, c) == 5  # 25/36 = 0.69
    assert mass_extent(m, 0.7, c) == 7
    assert area_ratio(m, 0.7, c) == 1.0
    assert area_ratio(m, 0.5, c) == pytest.approx(25 / 36)
    assert mass_extent_per_axis(m, 0.5, c) == (5, 5)  # 5/6 > 0.5 > 3/6
    assert mass_extent_per_axis(m, 0.9, c) == (7, 7)


def test_non_square_map() -> None:
    # 5 x 9 ones, centre (2, 4). Clipped cube pixel counts by radius:
    # 0: 1; 1: 3*3 = 9; 2: 5*5 = 25; 3: rows 0..4 (5) x cols 1..7 (7) = 35; 4: 5*9 = 45.
    m = torch.ones(5, 9)
    c = (2, 4)
    assert mass_extent(m, 0.5, c) == 5  # 25/45 = 0.556
    assert mass_extent(m, 0.6, c) == 7  # 35/45 = 0.778
    assert mass_extent(m, 0.8, c) == 9
    assert area_ratio(m, 0.6, c) == pytest.approx(35 / 45)
    assert area_ratio(m, 0.8, c) == 1.0
    # Per axis: rows uniform over 5 (5 -> 5/5), cols uniform over 9 (w/9).
    assert mass_extent_per_axis(m, 0.5, c) == (3, 5)  # 3/5 = 0.6; 5/9 = 0.556


def test_off_centre_clipping_near_border() -> None:
    # 10 x 10 ones, centre (0, 1). Radius i covers rows 0..min(i, 9) and cols
    # max(1 - i, 0)..min(1 + i, 9): i=0 -> 1*1, i=1 -> 2*3, i=2 -> 3*4, i=3 -> 4*5,
    # ..., i=8 -> 9*10, i=9 -> 10*10 (covering, side 19).
    m = torch.ones(10, 10)
    c = (0, 1)
    counts = [(min(i, 9) + 1) * (min(1 + i, 9) - max(1 - i, 0) + 1) for i in range(10)]
    assert counts[:4] == [1, 6, 12, 20]
    for t in (0.005, 0.05, 0.1, 0.3, 0.5, 0.85, 0.95):
        i = next(i for i, n in enumerate(counts) if n / 100 > t)
        assert mass_extent(m, t, c) == 2 * i + 1
        assert area_ratio(m, t, c) == pytest.approx(counts[i] / 100)
    assert mass_extent(m, 0.95, c) == 19
    assert area_ratio(m, 0.95, c) == 1.0
    assert mass_extent_per_axis(m, 0.5, c) == (11, 9)  # rows 0..5 hold 6/10; cols 0..5 too


@pytest.mark.parametrize("h", [16, 17, 32, 33])
def test_uniform_full_map_matches_published_square(h: int) -> None:
    data = np.ones((h, h))
    c = (h // 2, h // 2)
    for t in (0.2, 0.3, 0.5):
        side, ratio = published_square(data, t)
        assert mass_extent(torch.from_numpy(data), t, c) == side
        assert area_ratio(torch.from_numpy(data), t, c) == pytest.approx(ratio)
        assert mass_extent(torch.from_numpy(data), t, c) == growing_cube(data, t, c)[0]
    # t = 0.99 needs (nearly) the whole map: RepLKNet gives up, we return the covering side.
    assert published_square(data, 0.99) is None
    assert mass_extent(torch.from_numpy(data), 0.99, c) == 2 * (h // 2) + 1
    assert area_ratio(torch.from_numpy(data), 0.99, c) == 1.0


@pytest.mark.parametrize("shape", [(37,), (24, 31), (30, 30), (9, 12, 7)])
def test_random_maps_match_extended_reference(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(shape))
    for trial in range(6):
        data = rng.random(shape) ** 4  # peaky, non-negative
        if trial % 2:
            data[data < 0.3] = 0.0  # sparse zeros too
        centre = tuple(int(rng.integers(0, s)) for s in shape)
        for t in rng.uniform(0.01, 0.99, size=5):
            side, count = growing_cube(data, float(t), centre)
            assert mass_extent(torch.from_numpy(data), float(t), centre) == side
            assert area_ratio(data, float(t), centre) == pytest.approx(count / data.size)
            for d in range(len(shape)):
                profile = data.sum(axis=tuple(k for k in range(len(shape)) if k != d))
                side_d = growing_cube(profile, float(t), (centre[d],))[0]
                assert mass_extent_per_axis(data, float(t), centre)[d] == side_d


def test_replknet_published_loop_agrees_on_a_peaked_map() -> None:
    # Where the published loop gives an answer and the centre pixel alone holds <= t,
    # the extended definition gives the same side.
    data = sampled_gaussian((64, 64), (32.0, 32.0), (6.0, 9.0)) + 1e-3
    for t in (0.2, 0.3, 0.5, 0.9):
        side, ratio = published_square(data, t)
        assert mass_extent(data, t, (32, 32)) == side
        assert area_ratio(data, t, (32, 32)) == pytest.approx(ratio)


def test_one_and_three_d_uniform_boxes() -> None:
    m1 = torch.zeros(15)
    m1[5:10] = 1.0  # 5 pixels around centre 7
    assert mass_extent(m1, 0.5, (7,)) == 3  # 3/5
    assert mass_extent(m1, 0.6, (7,)) == 5
    assert mass_extent_per_axis(m1, 0.6, (7,)) == (5,)
    assert area_ratio(m1, 0.6, (7,)) == pytest.approx(5 / 15)
    m3 = torch.zeros(7, 9, 11)
    m3[2:5, 3:6, 4:7] = 1.0  # 3^3 cube around (3, 4, 5); radius 0 holds 1/27
    assert mass_extent(m3, 0.03, (3, 4, 5)) == 1
    assert mass_extent(m3, 0.04, (3, 4, 5)) == 3
    assert area_ratio(m3, 0.04, (3, 4, 5)) == pytest.approx(27 / (7 * 9 * 11))
    assert mass_extent_per_axis(m3, 0.5, (3, 4, 5)) == (3, 3, 3)  # 1/3 then 3/3


def test_coverage_and_erf_size_are_the_095_wrappers() -> None:
    assert COVERAGE_MASS == 0.95
    data = sampled_gaussian((40, 50), (20.0, 25.0), (4.0, 7.0))
    c = (20, 25)
    assert erf_size(data, c) == growing_cube(data, 0.95, c)[0]
    assert coverage(data, c) == pytest.approx(growing_cube(data, 0.95, c)[1] / 2000)


def test_zero_map() -> None:
    for shape in [(5,), (4, 6), (3, 4, 5)]:
        z = torch.zeros(shape)
        c = tuple(s // 2 for s in shape)
        assert mass_extent(z, 0.5, c) == 0
        assert mass_extent_per_axis(z, 0.5, c) == (0,) * len(shape)
        assert area_ratio(z, 0.5, c) == 0.0
        assert erf_size(z, c) == 0
        assert coverage(z, c) == 0.0
        assert all(math.isnan(v) for v in centroid(z))
        assert all(math.isnan(v) for v in sigma(z))
        assert len(centroid(z)) == len(sigma(z)) == len(shape)
        assert math.isnan(gaussian_r2(z))
        assert torch.equal(replknet_normalise(z), torch.zeros(shape))


def test_return_types() -> None:
    m = torch.rand(8, 8, dtype=torch.float64)
    assert type(mass_extent(m, 0.5, (4, 4))) is int
    assert all(type(v) is int for v in mass_extent_per_axis(m, 0.5, (4, 4)))
    assert type(area_ratio(m, 0.5, (4, 4))) is float
    assert all(type(v) is float for v in centroid(m) + sigma(m))
    assert type(gaussian_r2(m)) is float
    assert isinstance(mass_extent_per_axis(m, 0.5, (4, 4)), tuple)


# --------------------------------------------------------------------------------------------
# Moments: box convolutions, dilation, Gaussians
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n"), [(3, 1), (3, 4), (5, 3), (2, 5), (7, 2)])
def test_box_convolution_variance_1d(k: int, n: int) -> None:
    profile = box_power(k, n)
    data = np.concatenate([np.zeros(6), profile, np.zeros(11)])  # placement must not matter
    (s,) = sigma(data)
    assert s**2 == pytest.approx(n * (k**2 - 1) / 12, rel=1e-12)
    # Centroid: the profile is symmetric about its middle index.
    assert centroid(data)[0] == pytest.approx(6 + (len(profile) - 1) / 2, rel=1e-12)


def test_box_convolution_variance_2d_and_3d_outer_products() -> None:
    py, px, pz = box_power(3, 4), box_power(5, 2), box_power(2, 3)
    m2 = outer(py, px)
    var2 = [v**2 for v in sigma(torch.from_numpy(m2))]
    assert var2 == pytest.approx([4 * 8 / 12, 2 * 24 / 12], rel=1e-12)
    m3 = np.pad(outer(pz, py, px), ((1, 2), (3, 0), (0, 4)))
    var3 = [v**2 for v in sigma(m3)]
    assert var3 == pytest.approx([3 * 3 / 12, 4 * 8 / 12, 2 * 24 / 12], rel=1e-12)


@pytest.mark.parametrize("d", [2, 3])
def test_dilation_multiplies_sigma(d: int) -> None:
    k, n = 3, 3
    plain = outer(box_power(k, n), box_power(k, n))
    dilated = outer(box_power(k, n, dilation=d), box_power(k, n, dilation=d))
    s_plain, s_dil = sigma(plain), sigma(dilated)
    expected = math.sqrt(n * (k**2 - 1) / 12)
    assert s_plain == pytest.approx((expected, expected), rel=1e-12)
    assert s_dil == pytest.approx((d * expected, d * expected), rel=1e-12)


def test_sampled_gaussian_fit_and_sigma() -> None:
    # 6+ sigma from the borders a sampled Gaussian's discrete variance equals sigma^2 up to
    # exponentially small terms.
    data = sampled_gaussian((96, 120), (47.0, 59.0), (6.0, 9.0))
    assert gaussian_r2(torch.from_numpy(data).float()) > 0.999
    assert sigma(data) == pytest.approx((6.0, 9.0), rel=1e-4)
    assert centroid(data) == pytest.approx((47.0, 59.0), abs=1e-6)


def test_gaussian_1d_and_3d() -> None:
    g1 = sampled_gaussian((101,), (50.0,), (7.0,))
    assert gaussian_r2(g1) > 0.999
    assert sigma(g1) == pytest.approx((7.0,), rel=1e-4)
    g3 = sampled_gaussian((40, 48, 36), (20.0, 22.5, 17.0), (3.0, 4.0, 2.5))
    assert gaussian_r2(g3) > 0.999
    assert sigma(g3) == pytest.approx((3.0, 4.0, 2.5), rel=1e-4)
    assert centroid(g3) == pytest.approx((20.0, 22.5, 17.0), abs=1e-6)


def test_gaussian_amplitude_does_not_matter() -> None:
    data = sampled_gaussian((50, 50), (25.0, 25.0), (5.0, 3.0))
    assert gaussian_r2(data * 1e-7) == pytest.approx(gaussian_r2(data), abs=1e-9)


def test_centroid_of_shifted_gaussian_equals_shift() -> None:
    patch = sampled_gaussian((41, 45), (20.0, 22.0), (4.0, 5.0))
    c0 = centroid(patch)
    assert c0 == pytest.approx((20.0, 22.0), abs=1e-9)  # symmetric about its middle
    for shift in [(0, 0), (5, 3), (12, 49), (59, 0)]:
        shifted = np.zeros((100, 94))
        shifted[shift[0] : shift[0] + 41, shift[1] : shift[1] + 45] = patch
        c1 = centroid(shifted)
        assert [b - a for a, b in zip(c0, c1)] == pytest.approx(list(shift), abs=1e-9)
        assert sigma(shifted) == pytest.approx(sigma(patch), rel=1e-9)
    # Off-grid mean: the centroid follows the generating mean (tails negligible at 6 sigma).
    off = sampled_gaussian((80, 80), (30.3, 41.7), (4.0, 5.0))
    assert centroid(off) == pytest.approx((30.3, 41.7), abs=1e-6)


def test_box_map_is_clearly_not_gaussian() -> None:
    m2 = torch.zeros(64, 64)
    m2[25:40, 25:40] = 1.0
    assert gaussian_r2(m2) < 0.9
    m1 = torch.zeros(64)
    m1[20:45] = 1.0
    assert gaussian_r2(m1) < 0.9
    m3 = torch.zeros(24, 24, 24)
    m3[6:18, 6:18, 6:18] = 1.0
    assert gaussian_r2(m3) < 0.9


def test_two_peak_map_has_low_r2() -> None:
    data = sampled_gaussian((64, 64), (18.0, 18.0), (3.0, 3.0)) + sampled_gaussian(
        (64, 64), (46.0, 46.0), (3.0, 3.0)
    )
    # The moment-matched Gaussian sits between the peaks, where the map is nearly zero.
    assert gaussian_r2(data) < 0.3
    # Its centroid is the midpoint and its sigma is dominated by the separation:
    # var = 3^2 + 14^2 per axis (mixture of two equal Gaussians at +-14).
    assert centroid(data) == pytest.approx((32.0, 32.0), abs=1e-6)
    assert sigma(data) == pytest.approx((math.sqrt(9 + 196),) * 2, rel=1e-4)


def test_constant_map_r2_is_nan_and_moments_are_uniform() -> None:
    m = torch.full((5, 8), 3.0)
    assert math.isnan(gaussian_r2(m))
    assert math.isnan(gaussian_r2(torch.ones(1)))
    # Uniform over n indices: mean (n-1)/2, variance (n^2 - 1)/12.
    assert centroid(m) == pytest.approx((2.0, 3.5))
    assert sigma(m) == pytest.approx((math.sqrt(24 / 12), math.sqrt(63 / 12)))


def test_line_map_has_zero_sigma_along_one_axis() -> None:
    # A Gaussian profile along x, all in one row: sigma_y = 0 handled by the delta limit.
    m = np.zeros((9, 61))
    m[4] = sampled_gaussian((61,), (30.0,), (5.0,))
    assert sigma(m)[0] == 0.0
    assert sigma(m)[1] == pytest.approx(5.0, rel=1e-4)
    assert centroid(m)[0] == 4.0
    assert gaussian_r2(m) > 0.999


def test_two_pixel_map_moments() -> None:
    m = torch.zeros(3, 6)
    m[0, 1] = 1.0
    m[2, 5] = 3.0
    # rows: mass 1 at 0, 3 at 2 -> mean 1.5, var (1*2.25 + 3*0.25)/4 = 0.75
    # cols: mass 1 at 1, 3 at 5 -> mean 4, var (1*9 + 3*1)/4 = 3
    assert centroid(m) == pytest.approx((1.5, 4.0))
    assert sigma(m) == pytest.approx((math.sqrt(0.75), math.sqrt(3.0)))


# --------------------------------------------------------------------------------------------
# RepLKNet normalisation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(17,), (12, 9), (4, 5, 6)])
def test_replknet_normalise_matches_formula(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    raw = rng.random(shape) * 1e3
    raw.flat[0] = 0.0
    logged = np.log10(raw + 1)
    expected = logged / np.max(logged)  # RepLKNet's two lines
    out = replknet_normalise(torch.from_numpy(raw))
    assert out.dtype == torch.float32
    assert out.shape == shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert out.max().item() == 1.0
    assert out.flatten()[0].item() == 0.0
    np.testing.assert_allclose(replknet_normalise(raw).numpy(), expected, rtol=1e-6, atol=1e-7)


def test_replknet_normalise_tiny_gradients_are_not_lost() -> None:
    raw = torch.tensor([0.0, 1e-18, 2e-18], dtype=torch.float64)
    # log10(1 + x) ~ x / ln 10 for tiny x, so the ratio is 1e-18 / 2e-18.
    assert replknet_normalise(raw).tolist() == pytest.approx([0.0, 0.5, 1.0])


# --------------------------------------------------------------------------------------------
# Inputs and validation
# --------------------------------------------------------------------------------------------


def test_accepts_numpy_int_and_grad_tensors_without_autograd() -> None:
    m = torch.zeros(7, 7)
    m[2:5, 2:5] = 1.0
    expected = mass_extent(m, 0.5, (3, 3))
    assert expected == 3
    assert mass_extent(m.numpy(), 0.5, (3, 3)) == 3
    assert mass_extent(m.to(torch.int64), 0.5, (3, 3)) == 3
    assert mass_extent(m.numpy().astype(np.int32), 0.5, np.array([3, 3])) == 3
    assert mass_extent(m, 0.5, (np.int64(3), torch.tensor(3))) == 3
    leaf = m.clone().requires_grad_(True)
    assert mass_extent(leaf, 0.5, (3, 3)) == 3
    assert sigma(leaf) == sigma(m)
    assert not replknet_normalise(leaf).requires_grad
    assert leaf.grad is None


def test_input_is_not_modified() -> None:
    m = torch.rand(10, 10)
    before = m.clone()
    for f in (centroid, sigma, gaussian_r2, replknet_normalise):
        f(m)
    mass_extent(m, 0.5, (5, 5))
    assert torch.equal(m, before)


@pytest.mark.parametrize("t", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf])
def test_bad_t(t: float) -> None:
    m = torch.ones(5, 5)
    with pytest.raises(ValueError, match="t must be"):
        mass_extent(m, t, (2, 2))
    with pytest.raises(ValueError, match="t must be"):
        mass_extent_per_axis(m, t, (2, 2))
    with pytest.raises(ValueError, match="t must be"):
        area_ratio(m, t, (2, 2))


def test_bad_t_type() -> None:
    with pytest.raises(TypeError, match="t must be"):
        mass_extent(torch.ones(3), "half", (1,))  # type: ignore[arg-type]


ALL_MAP_FUNCS: list[Callable[[Any], object]] = [
    lambda m: mass_extent(m, 0.5, (1,) * m.ndim),
    lambda m: mass_extent_per_axis(m, 0.5, (1,) * m.ndim),
    lambda m: area_ratio(m, 0.5, (1,) * m.ndim),
    lambda m: erf_size(m, (1,) * m.ndim),
    lambda m: coverage(m, (1,) * m.ndim),
    centroid,
    sigma,
    gaussian_r2,
    replknet_normalise,
]


@pytest.mark.parametrize("func", ALL_MAP_FUNCS)
@pytest.mark.parametrize("shape", [(4,), (4, 4), (4, 4, 4)])
def test_bad_values(func: Callable[[Any], object], shape: tuple[int, ...]) -> None:
    m = torch.ones(shape)
    m[(2,) * len(shape)] = -1e-6
    with pytest.raises(ValueError, match="negative"):
        func(m)
    for bad in (math.nan, math.inf, -math.inf):
        m = torch.ones(shape)
        m[(2,) * len(shape)] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            func(m)
        with pytest.raises(ValueError, match="NaN or Inf"):
            func(m.numpy())


@pytest.mark.parametrize("func", ALL_MAP_FUNCS[5:])
def test_bad_types_and_shapes(func: Callable[[Any], object]) -> None:
    with pytest.raises(TypeError, match=r"torch\.Tensor or numpy\.ndarray"):
        func([[1.0, 2.0]])
    with pytest.raises(TypeError, match="real"):
        func(torch.ones(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="real"):
        func(np.array(["a", "b"]))
    with pytest.raises(ValueError, match="0-d"):
        func(torch.tensor(1.0))
    with pytest.raises(ValueError, match="empty"):
        func(torch.ones(0, 3))


def test_bad_centre() -> None:
    m = torch.ones(4, 6)
    for f in (mass_extent, mass_extent_per_axis, area_ratio):
        with pytest.raises(ValueError, match="2 dims"):
            f(m, 0.5, (2,))
        with pytest.raises(ValueError, match="outside the map"):
            f(m, 0.5, (4, 0))
        with pytest.raises(ValueError, match="outside the map"):
            f(m, 0.5, (0, -1))
        with pytest.raises(TypeError, match="centre"):
            f(m, 0.5, (1.5, 2))
        with pytest.raises(TypeError, match="centre"):
            f(m, 0.5, 2)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="centre"):
            f(m, 0.5, (True, 2))
    with pytest.raises(ValueError, match="outside the map"):
        erf_size(m, (2, 6))
    with pytest.raises(ValueError, match="outside the map"):
        coverage(m, (-1, 0))


def test_every_centre_of_a_small_3d_map_matches_reference() -> None:
    rng = np.random.default_rng(7)
    data = rng.random((4, 5, 3))
    for centre in itertools.product(range(4), range(5), range(3)):
        for t in (0.1, 0.5, 0.9):
            side, count = growing_cube(data, t, centre)
            assert mass_extent(data, t, centre) == side
            assert area_ratio(data, t, centre) == pytest.approx(count / data.size)
