"""Pure metrics on ERF maps (DESIGN §2): mass extent, area ratio, moments, Gaussian fit.

Every function takes one non-negative map ``heatmap`` of spatial shape ``S`` (1, 2 or 3 dims;
no batch or channel dim) as a ``torch.Tensor`` or NumPy array, computes in float64 on the CPU
without autograd, and returns plain Python numbers. ``centre`` is an integer pixel index per
dim, inside the map (the probe passes the rounded theoretical centre).

Conventions shared by the functions below:

* The centred cube of radius ``i`` is ``[centre - i, centre + i]`` on every axis, *clipped to the
  map* when summing; its side is ``2 * i + 1`` (not clipped).
* A map that is zero everywhere has extent 0, area ratio 0.0 and NaN moments and R².
* Negative, NaN or infinite values are a ``ValueError`` naming the problem.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from erf_monitor.core.modes import Mode

__all__ = [
    "COVERAGE_MASS",
    "OPENERF_RADII",
    "GaussianFit",
    "area_ratio",
    "centroid",
    "coverage",
    "disc_mass",
    "erf_size",
    "finalise_map",
    "gaussian_fit",
    "gaussian_r2",
    "mass_extent",
    "mass_extent_per_axis",
    "replknet_normalise",
    "sigma",
]

#: Mass fraction that defines the ERF size ``m(0.95)`` and the coverage ``a(0.95)``.
COVERAGE_MASS = 0.95

MapLike = torch.Tensor | np.ndarray


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------
def _as_float64(heatmap: MapLike, *, name: str = "heatmap") -> torch.Tensor:
    """Detached float64 CPU copy of ``heatmap`` after checking shape, dtype and values."""
    if isinstance(heatmap, np.ndarray):
        if heatmap.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a real-valued array, got dtype {heatmap.dtype}")
        x = torch.from_numpy(np.asarray(heatmap, dtype=np.float64))
    elif isinstance(heatmap, torch.Tensor):
        if heatmap.is_complex():
            raise TypeError(f"{name} must be real-valued, got dtype {heatmap.dtype}")
        x = heatmap.detach().to(device="cpu", dtype=torch.float64)
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy.ndarray, got {type(heatmap).__name__}"
        )
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one spatial dim, got a 0-d scalar")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{name} contains NaN or Inf values (shape {tuple(x.shape)}); an ERF map must be finite"
        )
    if bool((x < 0).any()):
        raise ValueError(
            f"{name} contains negative values (min {x.min().item():.6g}, shape "
            f"{tuple(x.shape)}); an ERF map must be non-negative"
        )
    return x


def _check_t(t: float) -> float:
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise TypeError(f"t must be a number in (0, 1), got {t!r}") from None
    if not 0.0 < t < 1.0:  # also rejects NaN
        raise ValueError(f"t must be a mass fraction strictly between 0 and 1, got {t!r}")
    return t


def _check_centre(centre: Sequence[int], shape: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(centre, (str, bytes)) or not isinstance(centre, Sequence | np.ndarray):
        raise TypeError(f"centre must be a sequence of ints, one per dim, got {centre!r}")
    if len(centre) != len(shape):
        raise ValueError(
            f"centre {tuple(centre)!r} has {len(centre)} entries but the map has "
            f"{len(shape)} dims (shape {shape})"
        )
    out = []
    for c in centre:
        if isinstance(c, bool):
            raise TypeError(f"centre entries must be ints, got {centre!r}")
        try:
            out.append(operator.index(c))
        except TypeError:
            raise TypeError(f"centre entries must be ints, got {centre!r}") from None
    for d, (c, s) in enumerate(zip(out, shape)):
        if not 0 <= c < s:
            raise ValueError(f"centre {tuple(out)} lies outside the map of shape {shape} (dim {d})")
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Mass extent
# --------------------------------------------------------------------------------------------
def _extent_radius(x: torch.Tensor, t: float, centre: tuple[int, ...]) -> int | None:
    """Smallest radius ``i`` whose clipped centred cube holds more than ``t`` of the mass.

    ``None`` for a zero map. Vectorised: every pixel belongs to the cube of radius ``i`` iff its
    Chebyshev distance to ``centre`` is ``<= i``, so the cube masses are the cumulative sum of a
    histogram of the map over that distance.
    """
    dist = torch.zeros((), dtype=torch.int64)
    for d, (c, s) in enumerate(zip(centre, x.shape)):
        view = [1] * x.dim()
        view[d] = s
        dist = torch.maximum(dist, (torch.arange(s) - c).abs().view(view))
    dist = dist.expand(x.shape)
    cube_mass = torch.bincount(dist.reshape(-1), weights=x.reshape(-1)).cumsum(0)
    # The last radius is the first cube that covers the whole map.
    total = cube_mass[-1]
    if total.item() == 0.0:
        return None
    # cube_mass[-1] / total is exactly 1.0 > t, so a hit always exists; keep the covering
    # radius as a fallback anyway.
    hits = torch.nonzero(cube_mass / total > t)
    return int(hits[0, 0]) if hits.numel() else cube_mass.numel() - 1


def mass_extent(heatmap: MapLike, t: float, centre: Sequence[int]) -> int:
    """Side of the smallest centred cube holding more than fraction ``t`` of the mass.

    RepLKNet's ``get_rectangle`` generalised to any number of dims: for ``i = 0, 1, 2, ...``
    the cube ``[centre - i, centre + i]`` on every axis is clipped to the map and its mass
    summed; the answer is ``2 * i + 1`` for the first ``i`` whose mass fraction is *strictly
    greater* than ``t``. Unlike RepLKNet (which starts at ``i = 1`` and gives up before the
    cube reaches the border), ``i`` starts at 0 and grows until the clipped cube covers the
    whole map; the side returned is the unclipped ``2 * i + 1``, so it can exceed the map's
    size when ``centre`` is off-centre or the map is even-sized.

    Args:
        heatmap: non-negative ERF map of spatial shape ``S``.
        t: mass fraction, strictly between 0 and 1.
        centre: integer pixel index per dim, inside the map.

    Returns:
        The odd side ``2 * i + 1``; 0 for a map that is zero everywhere.

    Raises:
        ValueError: ``t`` outside (0, 1), ``centre`` of the wrong length or outside the map,
            or a map with negative, NaN or infinite values.
        TypeError: a map that is not a real tensor/array.

    Examples:
        >>> import torch
        >>> m = torch.zeros(9, 9)
        >>> m[2:7, 2:7] = 1.0  # a 5 x 5 box of mass 25
        >>> mass_extent(m, 0.3, (4, 4))  # 3 x 3 holds 9/25 = 0.36 > 0.3
        3
        >>> mass_extent(m, 0.5, (4, 4))
        5
    """
    x = _as_float64(heatmap)
    t = _check_t(t)
    c = _check_centre(centre, tuple(x.shape))
    i = _extent_radius(x, t, c)
    return 0 if i is None else 2 * i + 1


def mass_extent_per_axis(heatmap: MapLike, t: float, centre: Sequence[int]) -> tuple[int, ...]:
    """:func:`mass_extent` of each axis' marginal profile, centred at ``centre[d]``.

    The marginal profile of axis ``d`` is the map summed over all other axes.

    Args:
        heatmap: non-negative ERF map of spatial shape ``S``.
        t: mass fraction, strictly between 0 and 1.
        centre: integer pixel index per dim, inside the map.

    Returns:
        One odd side per axis (zeros for a zero map).

    Raises:
        ValueError: as :func:`mass_extent`.
        TypeError: as :func:`mass_extent`.

    Examples:
        >>> import torch
        >>> m = torch.zeros(5, 11)
        >>> m[2, 2:9] = 1.0  # a 1 x 7 bar
        >>> mass_extent_per_axis(m, 0.5, (2, 5))
        (1, 5)
    """
    x = _as_float64(heatmap)
    t = _check_t(t)
    c = _check_centre(centre, tuple(x.shape))
    out = []
    for d in range(x.dim()):
        i = _extent_radius(_marginal(x, d), t, (c[d],))
        out.append(0 if i is None else 2 * i + 1)
    return tuple(out)


def area_ratio(heatmap: MapLike, t: float, centre: Sequence[int]) -> float:
    """Volume of the :func:`mass_extent` cube, clipped to the map, over the map's pixel count.

    For a cube inside the map this is DESIGN's ``a(t) = m(t)^2 / (H * W)`` (``m(t)^D / prod(S)``
    in ``D`` dims); a cube reaching the border counts only its pixels inside the map, so the
    ratio never exceeds 1.

    Args:
        heatmap: non-negative ERF map of spatial shape ``S``.
        t: mass fraction, strictly between 0 and 1.
        centre: integer pixel index per dim, inside the map.

    Returns:
        A fraction in ``(0, 1]``; 0.0 for a zero map.

    Raises:
        ValueError: as :func:`mass_extent`.
        TypeError: as :func:`mass_extent`.

    Examples:
        >>> import torch
        >>> m = torch.zeros(10, 10)
        >>> m[3:6, 3:6] = 1.0
        >>> area_ratio(m, 0.9, (4, 4))  # the 3 x 3 box: 9 of 100 pixels
        0.09
    """
    x = _as_float64(heatmap)
    t = _check_t(t)
    c = _check_centre(centre, tuple(x.shape))
    i = _extent_radius(x, t, c)
    if i is None:
        return 0.0
    volume = 1
    for cd, s in zip(c, x.shape):
        volume *= min(cd + i, s - 1) - max(cd - i, 0) + 1
    return volume / x.numel()


def erf_size(heatmap: MapLike, centre: Sequence[int]) -> int:
    """ERF size in pixels: ``mass_extent(heatmap, COVERAGE_MASS, centre)`` (``m(0.95)``).

    Args:
        heatmap: non-negative ERF map of spatial shape ``S``.
        centre: integer pixel index per dim, inside the map.

    Returns:
        The odd side of the 95%-mass cube; 0 for a zero map.

    Examples:
        >>> import torch
        >>> erf_size(torch.ones(7), (3,))
        7
    """
    return mass_extent(heatmap, COVERAGE_MASS, centre)


def coverage(heatmap: MapLike, centre: Sequence[int]) -> float:
    """Coverage: ``area_ratio(heatmap, COVERAGE_MASS, centre)`` (``a(0.95)``).

    The fraction of the input inside the 95%-mass cube; what the "ERF too small" alert
    compares with its threshold.

    Args:
        heatmap: non-negative ERF map of spatial shape ``S``.
        centre: integer pixel index per dim, inside the map.

    Returns:
        A fraction in ``(0, 1]``; 0.0 for a zero map.

    Examples:
        >>> import torch
        >>> m = torch.zeros(10, 10)
        >>> m[4, 4] = 1.0
        >>> coverage(m, (4, 4))
        0.01
    """
    return area_ratio(heatmap, COVERAGE_MASS, centre)


# --------------------------------------------------------------------------------------------
# Moments and Gaussian fit
# --------------------------------------------------------------------------------------------
def _marginal(x: torch.Tensor, d: int) -> torch.Tensor:
    """Profile of axis ``d``: ``x`` summed over every other axis."""
    others = [k for k in range(x.dim()) if k != d]
    return x.sum(dim=others) if others else x


def _moments(x: torch.Tensor) -> tuple[list[float], list[float]] | None:
    """Per-axis centroid and variance of a validated float64 map; ``None`` for a zero map.

    An axis whose marginal profile has a single non-zero entry is a delta along that axis:
    its centroid is that index and its variance exactly 0 (the generic formula would leave
    rounding noise of order 1e-30 there, which matters when dividing by sigma).
    """
    if not bool((x > 0).any()):
        return None
    mus: list[float] = []
    variances: list[float] = []
    for d in range(x.dim()):
        p = _marginal(x, d)
        nonzero = torch.nonzero(p > 0)
        if nonzero.numel() == 1:
            mus.append(float(nonzero[0, 0]))
            variances.append(0.0)
            continue
        idx = torch.arange(p.numel(), dtype=torch.float64)
        total = p.sum()
        mu = (idx * p).sum() / total
        var = ((idx - mu) ** 2 * p).sum() / total  # two-pass: about the centroid
        mus.append(mu.item())
        variances.append(max(var.item(), 0.0))
    return mus, variances


def centroid(heatmap: MapLike) -> tuple[float, ...]:
    """Mass-weighted mean pixel index per axis.

    Args:
        heatmap: non-negative ERF map of spatial shape ``S``.

    Returns:
        One float per axis; all NaN for a map that is zero everywhere.

    Raises:
        ValueError: a map with negative, NaN or infinite values.
        TypeError: a map that is not a real tensor/array.

    Examples:
        >>> import torch
        >>> m = torch.zeros(4, 5)
        >>> m[1, 1] = 1.0
        >>> m[1, 4] = 3.0
        >>> centroid(m)
        (1.0, 3.25)
    """
    x = _as_float64(heatmap)
    moments = _moments(x)
    if moments is None:
        return (math.nan,) * x.dim()
    return tuple(moments[0])


def sigma(heatmap: MapLike) -> tuple[float, ...]:
    """Per-axis standard deviation of the map from its second central moments.

    ``sigma_d^2 = sum_x E[x] (x_d - mu_d)^2 / sum_x E[x]`` with ``mu`` the :func:`centroid`
    (the map treated as a distribution over pixel indices, no Bessel correction). A map whose
    mass lies in a single index along axis ``d`` has ``sigma_d == 0.0`` exactly.

    Args:
        heatmap: non-negative ERF map of spatial shape ``S``.

    Returns:
        One float per axis, in pixels; all NaN for a map that is zero everywhere.

    Raises:
        ValueError: a map with negative, NaN or infinite values.
        TypeError: a map that is not a real tensor/array.

    Examples:
        >>> import torch
        >>> sigma(torch.tensor([1.0, 0.0, 1.0]))  # mass at -1 and +1 around the centroid
        (1.0,)
    """
    x = _as_float64(heatmap)
    moments = _moments(x)
    if moments is None:
        return (math.nan,) * x.dim()
    return tuple(math.sqrt(v) for v in moments[1])


def gaussian_r2(heatmap: MapLike) -> float:
    """R² of the moment-matched, axis-aligned Gaussian: how Gaussian the map is.

    The model is ``A * g(x)`` with ``g(x) = exp(-1/2 * sum_d ((x_d - mu_d) / sigma_d)^2)``,
    ``mu`` and ``sigma`` from :func:`centroid` and :func:`sigma`, and the amplitude fitted by
    least squares, ``A = <E, g> / <g, g>``. Then
    ``R² = 1 - sum (E - A g)^2 / sum (E - mean(E))^2``: 1 for a perfect fit, lower (possibly
    negative) for boxes, rings or several peaks.

    An axis with ``sigma_d == 0`` (all mass in one index along it) uses the ``sigma -> 0``
    limit of the Gaussian at integer pixels: 1 at that index, 0 elsewhere. So a single-pixel
    delta (in a map with more than one pixel) is fitted exactly, R² = 1.

    Args:
        heatmap: non-negative ERF map of spatial shape ``S``.

    Returns:
        R² as a float; NaN for a map that is constant (in particular zero) everywhere, where
        the total variance is 0.

    Raises:
        ValueError: a map with negative, NaN or infinite values.
        TypeError: a map that is not a real tensor/array.

    Examples:
        >>> import torch
        >>> y, x = torch.meshgrid(torch.arange(41.0), torch.arange(41.0), indexing="ij")
        >>> g = torch.exp(-0.5 * (((y - 20) / 3) ** 2 + ((x - 18) / 5) ** 2))
        >>> round(gaussian_r2(g), 6)
        1.0
        >>> gaussian_r2(torch.ones(5, 5))  # constant: undefined
        nan
    """
    x = _as_float64(heatmap)
    if bool(x.max() == x.min()):
        return math.nan
    moments = _moments(x)
    if moments is None:  # pragma: no cover - a zero map is constant
        return math.nan
    mus, variances = moments
    # The model is separable: g = outer product of one 1-D factor per axis.
    g = torch.ones((), dtype=torch.float64)
    for d, (mu, var) in enumerate(zip(mus, variances)):
        idx = torch.arange(x.shape[d], dtype=torch.float64)
        if var == 0.0:
            factor = (idx == mu).to(torch.float64)  # mu is an exact integer here
        else:
            factor = torch.exp(-0.5 * (idx - mu) ** 2 / var)
        view = [1] * x.dim()
        view[d] = x.shape[d]
        g = g * factor.view(view)
    g = g.expand(x.shape)
    # <g, g> > 0: the variance is at least the squared distance from mu to the nearest
    # integer, so g is at least exp(-1/2) per axis there.
    amplitude = (x * g).sum() / (g * g).sum()
    residual = ((x - amplitude * g) ** 2).sum()
    spread = ((x - x.mean()) ** 2).sum()
    return float(1.0 - residual / spread)


# --------------------------------------------------------------------------------------------
# RepLKNet normalisation
# --------------------------------------------------------------------------------------------
def replknet_normalise(raw_sum_map: MapLike) -> torch.Tensor:
    """RepLKNet's display/analysis normalisation ``A = log10(map + 1) / max(log10(map + 1))``.

    ``map`` is the *mean* over images of the per-image maps (RepLKNet's ``analyze_erf.py``
    loads the average that ``visualize_erf.py`` saved); the log is not scale-free, so the
    caller averages first (:func:`finalise_map`).

    Computed as ``log1p(map) / log1p(max(map))`` in float64 (the same value; ``log10(map + 1)``
    would round small gradients, e.g. ``1e-17``, to exactly 0).

    Args:
        raw_sum_map: non-negative mean over images of the channel-summed relu'd gradients,
            spatial shape ``S``.

    Returns:
        A float32 CPU tensor of shape ``S`` with values in ``[0, 1]`` and maximum 1; a map
        that is zero everywhere stays zero.

    Raises:
        ValueError: a map with negative, NaN or infinite values.
        TypeError: a map that is not a real tensor/array.

    Examples:
        >>> import torch
        >>> replknet_normalise(torch.tensor([0.0, 9.0, 99.0]))
        tensor([0.0000, 0.5000, 1.0000])
    """
    x = _as_float64(raw_sum_map, name="raw_sum_map")
    logged = torch.log1p(x)
    peak = logged.max()
    if peak.item() == 0.0:
        return torch.zeros(x.shape, dtype=torch.float32)
    return (logged / peak).to(torch.float32)


# --------------------------------------------------------------------------------------------
# OpenERF metrics: mass in discs of fixed radii, free-centre 2-D Gaussian fit
# --------------------------------------------------------------------------------------------
#: OpenERF's default radii (pixels) for the cumulative disc mass.
OPENERF_RADII: tuple[int, ...] = (5, 10, 20, 30, 40, 60, 80)


def disc_mass(
    heatmap: MapLike, radii: Sequence[float], centre: Sequence[int]
) -> dict[float, float]:
    """Fraction of the map's mass within Euclidean distance ``r`` of ``centre``, per radius.

    OpenERF's "radial cumulative mass": the map is normalised to sum 1 and, for each radius
    ``r``, the mass of the pixels ``p`` with ``||p - centre||_2 <= r`` (pixel indices, the
    boundary included) is summed. OpenERF centres the discs on ``(H // 2, W // 2)``;
    :meth:`~erf_monitor.ERFResult.disc_mass` uses the layer's theoretical centre pixel (the
    same pixel for a centred, odd-sized layer). Works for 1 to 3 dims (intervals, discs,
    balls).

    Args:
        heatmap: non-negative ERF map of spatial shape ``S``.
        radii: non-negative radii in pixels.
        centre: integer pixel index per dim, inside the map.

    Returns:
        ``{r: fraction}`` in the order of ``radii``; NaN fractions for a map that is zero
        everywhere (there is no mass to divide).

    Raises:
        ValueError: a bad map, a negative or non-finite radius, a centre outside the map.
        TypeError: a map that is not a real tensor/array.

    Examples:
        >>> import torch
        >>> disc_mass(torch.ones(5, 5), [0, 1, 1.5], (2, 2))  # 1, 5 and 9 of 25 pixels
        {0: 0.04, 1: 0.2, 1.5: 0.36}
    """
    x = _as_float64(heatmap)
    c = _check_centre(centre, tuple(x.shape))
    rs = []
    for r in radii:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
            raise ValueError(f"radii must be finite numbers >= 0, got {r!r}")
        rs.append(r)
    total = x.sum().item()
    if total == 0.0:
        return dict.fromkeys(rs, math.nan)
    dist2 = torch.zeros((), dtype=torch.float64)
    for d, (cd, s) in enumerate(zip(c, x.shape)):
        view = [1] * x.dim()
        view[d] = s
        dist2 = dist2 + ((torch.arange(s, dtype=torch.float64) - cd) ** 2).view(view)
    dist2 = dist2.expand(x.shape)
    return {r: float(x[dist2 <= float(r) ** 2].sum().item() / total) for r in rs}


@dataclass(frozen=True)
class GaussianFit:
    """A 2-D Gaussian fitted to an ERF map normalised to sum 1 (OpenERF's model).

    ``G(y, x) = amplitude * N((y, x); centre, covariance)``, ``N`` the normalised bivariate
    normal density, so ``amplitude`` is the share of the map's mass the Gaussian carries
    (1 for a map that is exactly Gaussian and well inside the input).

    Attributes:
        amplitude: integral of the fitted Gaussian over the plane, in units of the map's mass.
        centre: ``(y, x)`` in pixel indices (free: not tied to the theoretical centre).
        sigma: ``(sigma_y, sigma_x)``, square roots of the covariance's diagonal, in pixels.
        covariance: ``((s_yy, s_yx), (s_xy, s_xx))`` in pixels²; diagonal unless fitted with
            ``rotated=True``.
        r2: ``1 - Var(G - p) / Var(p)`` over all pixels (``p`` the normalised map): OpenERF's
            R², which subtracts the residual's mean (1: a perfect fit).
        rotated: whether the covariance was free to tilt (``False``: axis-aligned, as OpenERF).
        converged: whether Levenberg-Marquardt met its tolerance within its iteration budget.
    """

    amplitude: float
    centre: tuple[float, float]
    sigma: tuple[float, float]
    covariance: tuple[tuple[float, float], tuple[float, float]]
    r2: float
    rotated: bool = False
    converged: bool = True


def _gaussian_and_jacobian(
    theta: np.ndarray, yy: np.ndarray, xx: np.ndarray, rotated: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Model values and their Jacobian for ``theta = (A, yc, xc, a, c[, b])``.

    ``(a, b, c)`` is the precision matrix ``[[a, b], [b, c]]`` (inverse covariance), so that
    ``G = A sqrt(ac - b^2) / (2 pi) exp(-(a dy^2 + 2 b dy dx + c dx^2) / 2)``.
    """
    amp, yc, xc, a, c = theta[:5]
    b = theta[5] if rotated else 0.0
    dy, dx = yy - yc, xx - xc
    det = a * c - b * b
    base = (
        math.sqrt(det)
        / (2 * math.pi)
        * np.exp(-0.5 * (a * dy * dy + 2 * b * dy * dx + c * dx * dx))
    )
    g = amp * base
    cols = [
        base,
        g * (a * dy + b * dx),
        g * (b * dy + c * dx),
        g * (c / (2 * det) - dy * dy / 2),
        g * (a / (2 * det) - dx * dx / 2),
    ]
    if rotated:
        cols.append(g * (-b / det - dy * dx))
    return g, np.stack(cols, axis=1)


def _valid(theta: np.ndarray, rotated: bool) -> bool:
    amp, _, _, a, c = theta[:5]
    b = theta[5] if rotated else 0.0
    return bool(np.all(np.isfinite(theta))) and amp >= 0 and a > 0 and c > 0 and a * c - b * b > 0


def gaussian_fit(heatmap: MapLike, *, rotated: bool = False) -> GaussianFit:
    """Least-squares fit of a free-centre 2-D Gaussian to the map normalised to sum 1.

    OpenERF's protocol (``openerf.fit.fit_2d_gaussian``): the model
    ``A exp(-((x - xc)^2 / (2 sx^2) + (y - yc)^2 / (2 sy^2))) / (2 pi sx sy)`` is fitted to
    ``p = E / sum(E)`` over every pixel by least squares with a free amplitude and centre, and
    ``R² = 1 - Var(residual) / Var(p)``. Implemented here with Levenberg-Marquardt on the
    precision-matrix form of the model (analytic Jacobian, float64), started from the map's
    moments, so the result is the least-squares optimum nearest the moment estimate. With
    ``rotated=True`` the covariance may also tilt (one more parameter, the correlation).

    Args:
        heatmap: non-negative 2-D ERF map.
        rotated: also fit the covariance's off-diagonal term.

    Returns:
        A :class:`GaussianFit`; every field NaN for a map that is zero everywhere, and NaN
        ``r2`` for a constant map.

    Raises:
        ValueError: a map that is not 2-D, or has negative, NaN or infinite values.
        TypeError: a map that is not a real tensor/array.

    Examples:
        >>> import torch
        >>> y, x = torch.meshgrid(torch.arange(40.0), torch.arange(50.0), indexing="ij")
        >>> g = torch.exp(-0.5 * (((y - 17.3) / 3.0) ** 2 + ((x - 26.0) / 5.0) ** 2))
        >>> fit = gaussian_fit(g)
        >>> [round(v, 4) for v in (*fit.centre, *fit.sigma, fit.amplitude, fit.r2)]
        [17.3, 26.0, 3.0, 5.0, 1.0, 1.0]
    """
    t = _as_float64(heatmap)
    if t.dim() != 2:
        raise ValueError(f"gaussian_fit needs a 2-D map, got shape {tuple(t.shape)}")
    nan = math.nan
    total = t.sum().item()
    if total == 0.0:
        return GaussianFit(nan, (nan, nan), (nan, nan), ((nan, nan), (nan, nan)), nan, rotated)
    p = (t / total).numpy().ravel()
    h, w = t.shape
    grid = np.meshgrid(
        np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
    )
    yy, xx = grid[0].ravel(), grid[1].ravel()
    # Start from the moments (the covariance floored at a quarter pixel², a delta's scale).
    my, mx = float((p * yy).sum()), float((p * xx).sum())
    cyy = max(float((p * (yy - my) ** 2).sum()), 0.25)
    cxx = max(float((p * (xx - mx) ** 2).sum()), 0.25)
    cyx = float((p * (yy - my) * (xx - mx)).sum()) if rotated else 0.0
    if cyy * cxx - cyx * cyx <= 0:
        cyx = 0.0
    det0 = cyy * cxx - cyx * cyx
    theta = np.array([1.0, my, mx, cxx / det0, cyy / det0] + ([-cyx / det0] if rotated else []))
    g, jac = _gaussian_and_jacobian(theta, yy, xx, rotated)
    res = g - p
    cost = float(res @ res)
    lam, converged = 1e-3, False
    for _ in range(200):
        jtj = jac.T @ jac
        grad = jac.T @ res
        improved = False
        for _ in range(30):  # raise the damping until a step lowers the cost
            step = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-300), -grad)
            cand = theta + step
            if _valid(cand, rotated):
                g_new, jac_new = _gaussian_and_jacobian(cand, yy, xx, rotated)
                res_new = g_new - p
                cost_new = float(res_new @ res_new)
                if cost_new < cost:
                    improved = True
                    break
            lam *= 10.0
        if not improved:
            converged = True  # no descent direction left: a (local) minimum
            break
        small = cost - cost_new <= 1e-12 * cost and np.all(
            np.abs(step) <= 1e-9 * (np.abs(theta) + 1e-9)
        )
        theta, g, jac, res, cost = cand, g_new, jac_new, res_new, cost_new
        lam = max(lam / 10.0, 1e-12)
        if small:
            converged = True
            break
    amp, yc, xc, a, c = (float(v) for v in theta[:5])
    b = float(theta[5]) if rotated else 0.0
    det = a * c - b * b
    s_yy, s_xx, s_yx = c / det, a / det, -b / det
    var_p = float(np.var(p))
    r2 = nan if var_p == 0.0 else 1.0 - float(np.var(res)) / var_p
    return GaussianFit(
        amplitude=amp,
        centre=(yc, xc),
        sigma=(math.sqrt(s_yy), math.sqrt(s_xx)),
        covariance=((s_yy, s_yx), (s_yx, s_xx)),
        r2=r2,
        rotated=rotated,
        converged=converged,
    )


def finalise_map(total: torch.Tensor, n: int, mode: Mode) -> torch.Tensor:
    """The published ERF map from the sum over ``n`` samples of the per-sample maps.

    The one place where a mode's normalisation over samples lives: a distributed probe sums
    the per-rank sums and calls this once. ``"luo"``: the mean; ``"replknet"``:
    ``log10(mean + 1) / max`` (RepLKNet averages its per-image maps before the log);
    ``"openerf"``: the sum divided by its total (mass 1).
    """
    total = total.double()
    if mode == "replknet":
        heat = replknet_normalise(total / n)
    elif mode == "openerf":
        mass = total.sum()
        heat = total / mass if float(mass) > 0 else torch.zeros_like(total)
    else:
        heat = total / n
    return heat.float().contiguous()
