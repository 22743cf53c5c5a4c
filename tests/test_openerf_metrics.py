"""OpenERF's metrics: cumulative mass in discs of fixed radii and a free-centre Gaussian fit.

References are independent: disc masses by a plain loop over pixels, Gaussian fits against
maps built from known parameters and against SciPy's ``curve_fit`` of OpenERF's own model
(``openerf.fit.fit_2d_gaussian``: axis-aligned, normalised map, ``R² = 1 - Var(res)/Var(p)``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import erf_monitor as em
from erf_monitor.measure.metrics import OPENERF_RADII, disc_mass, gaussian_fit


def disc_mass_by_loop(m: np.ndarray, radii: list[float], centre: tuple[int, int]) -> list[float]:
    total = float(m.sum())
    out = []
    for r in radii:
        acc = 0.0
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if math.hypot(i - centre[0], j - centre[1]) <= r:
                    acc += float(m[i, j])
        out.append(acc / total)
    return out


def gaussian_map(
    shape: tuple[int, int], centre: tuple[float, float], cov: np.ndarray, amp: float = 1.0
) -> np.ndarray:
    yy, xx = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    d = np.stack([yy - centre[0], xx - centre[1]], axis=-1).astype(np.float64)
    prec = np.linalg.inv(cov)
    q = np.einsum("...i,ij,...j->...", d, prec, d)
    return amp * np.exp(-0.5 * q) / (2 * math.pi * math.sqrt(np.linalg.det(cov)))


# ----------------------------------------------------------------------------- disc mass


def test_disc_mass_matches_a_loop_over_pixels() -> None:
    rng = np.random.default_rng(0)
    m = rng.random((23, 31)) ** 3
    radii = [0, 1, math.sqrt(2), 2.5, 5, 10, 40]
    for centre in [(11, 15), (0, 0), (22, 7)]:
        got = disc_mass(m, radii, centre)
        assert list(got) == radii
        np.testing.assert_allclose(list(got.values()), disc_mass_by_loop(m, radii, centre))


def test_disc_mass_of_a_uniform_disc() -> None:
    # A uniform disc of radius 6: the mass within r is (pixels within r) / (pixels within 6).
    yy, xx = np.meshgrid(np.arange(21), np.arange(21), indexing="ij")
    inside = lambda r: (yy - 10) ** 2 + (xx - 10) ** 2 <= r * r  # noqa: E731
    m = inside(6).astype(float)
    got = disc_mass(m, [0, 3, 6, 9], (10, 10))
    assert got == pytest.approx({0: 1 / 113, 3: 29 / 113, 6: 1.0, 9: 1.0})
    assert int(inside(6).sum()) == 113 and int(inside(3).sum()) == 29  # Gauss circle counts


def test_disc_mass_edge_cases() -> None:
    assert all(math.isnan(v) for v in disc_mass(np.zeros((4, 4)), [1, 2], (2, 2)).values())
    assert disc_mass(np.arange(5.0), [1], (2,)) == {1: pytest.approx(6 / 10)}  # 1-D: 1+2+3
    with pytest.raises(ValueError, match="radii"):
        disc_mass(np.ones((3, 3)), [-1], (1, 1))
    with pytest.raises(ValueError, match="outside"):
        disc_mass(np.ones((3, 3)), [1], (3, 1))


# ----------------------------------------------------------------------------- gaussian fit


def test_fit_recovers_an_exact_axis_aligned_gaussian() -> None:
    cov = np.diag([2.5**2, 4.0**2])
    m = 7.0 * gaussian_map((40, 50), (17.3, 29.6), cov)  # any overall scale
    fit = gaussian_fit(m)
    assert fit.converged and not fit.rotated
    assert fit.centre == pytest.approx((17.3, 29.6), abs=1e-6)
    assert fit.sigma == pytest.approx((2.5, 4.0), abs=1e-6)
    assert fit.amplitude == pytest.approx(1.0, abs=1e-6)  # normalised map: all mass
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)


def test_rotated_fit_recovers_the_covariance() -> None:
    cov = np.array([[9.0, 4.8], [4.8, 16.0]])  # correlation 0.4
    m = gaussian_map((45, 45), (21.0, 23.5), cov)
    fit = gaussian_fit(m, rotated=True)
    np.testing.assert_allclose(np.array(fit.covariance), cov, atol=1e-5)
    assert fit.sigma == pytest.approx((3.0, 4.0), abs=1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert gaussian_fit(m).r2 < 1 - 1e-3  # the axis-aligned model cannot tilt


def test_fit_matches_scipy_curve_fit_of_openerf_model() -> None:
    optimize = pytest.importorskip("scipy.optimize")
    # Not a Gaussian: a uniform disc plus an off-centre blob on a weak background.
    yy, xx = np.meshgrid(np.arange(48), np.arange(40), indexing="ij")
    m = ((yy - 22) ** 2 + (xx - 18) ** 2 <= 81).astype(float)
    m += 0.6 * np.exp(-((yy - 30) ** 2 + (xx - 25) ** 2) / 18.0) + 0.01
    p = m / m.sum()

    def model(mesh: tuple[np.ndarray, np.ndarray], amp: float, xc: float, yc: float,
              sx: float, sy: float) -> np.ndarray:  # fmt: skip
        x, y = mesh
        g = amp * np.exp(-((x - xc) ** 2 / (2 * sx**2) + (y - yc) ** 2 / (2 * sy**2)))
        return (g / (2 * np.pi * sx * sy)).ravel()

    ours = gaussian_fit(m)
    start = [ours.amplitude * 0.9, ours.centre[1] + 1, ours.centre[0] - 1, 5.0, 5.0]
    popt, _ = optimize.curve_fit(
        model, (xx, yy), p.ravel(), p0=start, maxfev=20000, ftol=1e-15, xtol=1e-15, gtol=1e-15
    )
    amp, xc, yc, sx, sy = popt
    residual = model((xx, yy), *popt) - p.ravel()
    r2 = 1.0 - residual.var() / p.var()
    assert ours.amplitude == pytest.approx(amp, rel=1e-5)
    assert ours.centre == pytest.approx((yc, xc), abs=1e-4)
    assert ours.sigma == pytest.approx((abs(sy), abs(sx)), rel=1e-5)
    assert ours.r2 == pytest.approx(r2, abs=1e-8)
    assert 0.0 < ours.r2 < 0.99


def test_fit_edge_cases() -> None:
    zero = gaussian_fit(np.zeros((5, 5)))
    assert math.isnan(zero.amplitude) and math.isnan(zero.r2)
    assert math.isnan(gaussian_fit(np.ones((5, 5))).r2)  # constant map: no variance to explain
    delta = np.zeros((9, 9))
    delta[4, 6] = 1.0
    fit = gaussian_fit(delta)
    assert fit.centre == pytest.approx((4.0, 6.0), abs=1e-3)
    with pytest.raises(ValueError, match="2-D"):
        gaussian_fit(np.ones((3, 3, 3)))


# ----------------------------------------------------------------------------- on results


def test_results_expose_and_log_openerf_metrics() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Conv2d(1, 1, 5, padding=2, bias=False) for _ in range(4)])
    for conv in net:
        nn.init.constant_(conv.weight, 1.0)
    r = em.compute_erf(net, torch.randn(2, 1, 41, 41), ["3"])["3"]
    # All-ones 5x5 convolutions, no nonlinearity: a product of two 1-D 4-fold box
    # convolutions (variance 4 * (25 - 1) / 12 = 8 per axis), centred on pixel 20.
    fit = r.gaussian_fit()
    assert fit.centre == pytest.approx((20.0, 20.0), abs=1e-6)
    assert fit.sigma[0] == pytest.approx(fit.sigma[1], rel=1e-6)
    # The least-squares sigma of a 4-fold box sum is near, not at, its moment sigma.
    assert fit.sigma[0] == pytest.approx(math.sqrt(8.0), rel=0.05)
    assert fit.r2 > 0.99
    assert r.gaussian_fit() is fit  # cached
    masses = r.disc_mass()
    assert list(masses) == list(OPENERF_RADII)
    assert masses[5] == pytest.approx(disc_mass_by_loop(r.heatmap.numpy(), [5], (20, 20))[0])
    assert masses[20] == pytest.approx(1.0)  # the 17x17 TRF lies inside the radius-20 disc
    s = r.scalars()
    assert s["disc_mass_r5"] == masses[5] and "disc_mass_r60" not in s  # r < map size only
    assert s["gauss_fit_sigma_y"] == fit.sigma[0] and s["gauss_fit_r2"] == fit.r2
    assert s["gauss_fit_offset_x"] == pytest.approx(0.0, abs=1e-6)
    assert s["gauss_fit_amplitude"] == pytest.approx(1.0, abs=0.05)


def test_fit_of_a_small_field_in_a_large_map_is_the_whole_map_optimum() -> None:
    """The fit runs on the map's support plus two residuals standing for every pixel outside
    it: the optimum must be the one of the plain least-squares problem over all pixels."""
    optimize = pytest.importorskip("scipy.optimize")
    yy, xx = np.meshgrid(np.arange(90), np.arange(120), indexing="ij")
    m = np.zeros((90, 120))
    m[40:49, 50:61] = 1.0  # a box: the Gaussian's tails reach far beyond it
    m[44, 55] = 3.0
    p = m / m.sum()

    def model(mesh: tuple[np.ndarray, np.ndarray], amp: float, yc: float, xc: float,
              sy: float, sx: float) -> np.ndarray:  # fmt: skip
        y, x = mesh
        g = amp * np.exp(-((x - xc) ** 2 / (2 * sx**2) + (y - yc) ** 2 / (2 * sy**2)))
        return (g / (2 * np.pi * sx * sy)).ravel()

    popt, _ = optimize.curve_fit(
        model, (yy, xx), p.ravel(), p0=[1.0, 44.0, 55.0, 3.0, 3.0], ftol=1e-15, xtol=1e-15,
        gtol=1e-15, maxfev=20000,
    )  # fmt: skip
    residual = model((yy, xx), *popt) - p.ravel()
    fit = gaussian_fit(m)
    assert fit.converged and fit.degenerate is None
    assert fit.amplitude == pytest.approx(popt[0], rel=1e-6)
    assert fit.centre == pytest.approx((popt[1], popt[2]), abs=1e-6)
    assert fit.sigma == pytest.approx((abs(popt[3]), abs(popt[4])), rel=1e-6)
    assert fit.r2 == pytest.approx(1.0 - residual.var() / p.var(), abs=1e-8)
    # R² and the sum of squares over all pixels, at our parameters, computed densely
    ours = model((yy, xx), fit.amplitude, *fit.centre, *fit.sigma) - p.ravel()
    assert fit.r2 == pytest.approx(1.0 - ours.var() / p.var(), abs=1e-12)
    assert (ours**2).sum() <= (residual**2).sum() * (1 + 1e-9)  # at least as good an optimum
    # started from its own optimum (a bootstrap resample's warm start), it stays there
    again = gaussian_fit(m, start=fit, check_unique=False)
    assert again.sigma == pytest.approx(fit.sigma, rel=1e-6)


def test_a_sub_pixel_gaussian_is_flagged_degenerate() -> None:
    # sigma 0.3 px: the pixels next to the peak hold exp(-1/(2 * 0.09)) = 0.4% of it
    m = gaussian_map((21, 21), (10.0, 10.0), np.diag([0.3**2, 0.3**2]))
    fit = gaussian_fit(m)
    assert fit.degenerate == "sub-pixel" and not fit.converged
    wide = gaussian_fit(gaussian_map((21, 21), (10.0, 10.0), np.diag([1.2**2, 0.9**2])))
    assert wide.degenerate is None and wide.converged  # a pixel-scale Gaussian is measured
    assert wide.sigma == pytest.approx((1.2, 0.9), abs=1e-6)


def test_a_symmetric_plus_has_two_equal_optima_and_is_flagged() -> None:
    # A "+" of two thin Gaussian bars: the best axis-aligned Gaussian is one bar, and the
    # other bar (its mirror image across the diagonal) fits exactly as well.
    yy, xx = np.meshgrid(np.arange(61.0), np.arange(61.0), indexing="ij")
    bar = lambda a, b: np.exp(-((a - 30) ** 2) / 2.0 - (b - 30) ** 2 / (2 * 15.0**2))  # noqa: E731
    plus = np.maximum(bar(yy, xx), bar(xx, yy))
    fit = gaussian_fit(plus)
    assert fit.degenerate == "ambiguous" and not fit.converged
    assert max(fit.sigma) > 5 * min(fit.sigma)  # one of the bars
    mirrored = gaussian_fit(plus.T)
    assert mirrored.r2 == pytest.approx(fit.r2, abs=1e-9)
    # the same bars with one of them 10% longer: a unique optimum, the longer bar
    longer = np.maximum(bar(yy, xx), np.exp(-((xx - 30) ** 2) / 2.0 - (yy - 30) ** 2 / 545.0))
    unique = gaussian_fit(longer)
    assert unique.degenerate is None and unique.converged
    assert unique.sigma[0] > 5 * unique.sigma[1]  # the vertical (longer) bar


def test_openerf_mode_centres_discs_on_the_middle_pixel() -> None:
    """OpenERF sums its discs around ``(H // 2, W // 2)`` of the map; the other modes around
    the seed unit's theoretical centre. Here they differ: a stride-2 layer on an even input
    has its centre unit (output 8 of 16) centred on input pixel 16.5 -> 17, not 16."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 4, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1))  # fmt: skip
    x = torch.randn(3, 1, 32, 32)
    for mode, expected_centre in (("openerf", (16, 16)), ("luo", None)):
        r = em.compute_erf(net, x, ["2"], mode=mode)["2"]
        centre = expected_centre or r.centre_pixel
        assert r.disc_centre == centre
        m = r.heatmap.double().numpy()
        want = disc_mass_by_loop(m, [5, 10, 20], centre)
        s = r.scalars()
        assert [s["disc_mass_r5"], s["disc_mass_r10"], s["disc_mass_r20"]] == pytest.approx(want)
        assert list(r.disc_mass([5, 10, 20]).values()) == pytest.approx(want)
    assert r.centre_pixel != (16, 16)  # the luo result: its own centre
