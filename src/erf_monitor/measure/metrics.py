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

import numpy as np
import torch

from erf_monitor.core.modes import Mode
from erf_monitor.core.threads import single_blas_thread
from erf_monitor.measure import profiles as _prof
from erf_monitor.measure.fit import GaussianFit, fit_gaussian
from erf_monitor.measure.profiles import Geometry, Profiles

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
def _as_array(heatmap: MapLike, *, name: str = "heatmap") -> np.ndarray:
    """Float64 NumPy view or copy of ``heatmap`` (never written to) after checking shape,
    dtype and values."""
    if isinstance(heatmap, np.ndarray):
        if heatmap.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a real-valued array, got dtype {heatmap.dtype}")
        x = np.asarray(heatmap, dtype=np.float64)
    elif isinstance(heatmap, torch.Tensor):
        if heatmap.is_complex():
            raise TypeError(f"{name} must be real-valued, got dtype {heatmap.dtype}")
        x = heatmap.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy.ndarray, got {type(heatmap).__name__}"
        )
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one spatial dim, got a 0-d scalar")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    low, high = x.min(), x.max()
    if not (low >= 0 and np.isfinite(high)):  # two reductions; NaN fails every comparison
        if not np.isfinite(x).all():
            raise ValueError(
                f"{name} contains NaN or Inf values (shape {tuple(x.shape)}); an ERF map must "
                "be finite"
            )
        raise ValueError(
            f"{name} contains negative values (min {low:.6g}, shape "
            f"{tuple(x.shape)}); an ERF map must be non-negative"
        )
    return x


def _as_float64(heatmap: MapLike, *, name: str = "heatmap") -> torch.Tensor:
    """:func:`_as_array` as a float64 CPU tensor."""
    return torch.from_numpy(_as_array(heatmap, name=name))


def _one(x: np.ndarray, centre: Sequence[int], **geometry: object) -> Profiles:
    """The profiles of one validated map (a batch of one)."""
    return Profiles(Geometry(tuple(x.shape), tuple(centre), **geometry), x[None])  # type: ignore[arg-type]


def _middle(x: np.ndarray) -> tuple[int, ...]:
    return tuple(s // 2 for s in x.shape)


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


def _checked(heatmap: MapLike, t: float, centre: Sequence[int]) -> tuple[Profiles, float]:
    """The profiles of a validated map about a validated ``centre``, and the checked ``t``."""
    x = _as_array(heatmap)
    t = _check_t(t)
    return _one(x, _check_centre(centre, tuple(x.shape))), t


# --------------------------------------------------------------------------------------------
# Mass extent
# --------------------------------------------------------------------------------------------
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
    p, t = _checked(heatmap, t, centre)
    i = int(_prof.extent_radius(p, t)[0])
    return 0 if i < 0 else 2 * i + 1


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
    p, t = _checked(heatmap, t, centre)
    radii = _prof.extent_radius_per_axis(p, t)
    return tuple(0 if int(i[0]) < 0 else 2 * int(i[0]) + 1 for i in radii)


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
    p, t = _checked(heatmap, t, centre)
    return float(_prof.area_ratio(p, t)[0])


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
    x = _as_array(heatmap)
    mus, _ = _prof.moments(_one(x, _middle(x)))
    return tuple(float(m) for m in mus[0])


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
    x = _as_array(heatmap)
    _, variances = _prof.moments(_one(x, _middle(x)))
    return tuple(math.sqrt(v) for v in variances[0])


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
    x = _as_array(heatmap)
    mus, variances = _prof.moments(_one(x, _middle(x)))
    return float(gaussian_r2_batch(x[None], mus, variances)[0])


def gaussian_r2_batch(
    maps: np.ndarray,
    mus: np.ndarray,
    variances: np.ndarray,
    window: Sequence[slice] | None = None,
    full_shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """:func:`gaussian_r2` of a batch of validated maps ``(B, *S)`` with their moments
    ``(B, nd)``; or of the part ``maps`` on ``window`` of maps of ``full_shape`` that are
    zero elsewhere."""
    b, shape = maps.shape[0], maps.shape[1:]
    starts = [0] * len(shape) if window is None else [w.start for w in window]
    full = shape if full_shape is None else full_shape
    # The model is separable, g = outer product of one 1-D factor f_d per axis, so
    # <E, g> contracts E (zero outside the window) with one factor at a time, and
    # <g, g> = prod_d |f_d|^2 over the whole map.
    inner = maps
    gg = np.ones(b)
    for d in reversed(range(len(shape))):
        s = shape[d]
        idx = np.arange(full[d], dtype=np.float64)[None, :]
        mu, var = mus[:, d : d + 1], variances[:, d : d + 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            # var == 0: the sigma -> 0 limit at integer pixels (mu is an exact integer there)
            f = np.where(var == 0.0, (idx == mu) * 1.0, np.exp(-0.5 * (idx - mu) ** 2 / var))
        gg = gg * (f * f).sum(1)
        f = np.ascontiguousarray(f[:, starts[d] : starts[d] + s])
        inner = (inner.reshape(b, -1, s) @ f[:, :, None]).reshape((b, *shape[:d]))
    flat = maps.reshape(b, -1)
    npix = math.prod(full)
    squares = np.einsum("bp,bp->b", flat, flat)
    # <g, g> > 0: the variance is at least the squared distance from mu to the nearest
    # integer, so g is at least exp(-1/2) per axis there. With the least-squares amplitude
    # A = <E, g> / <g, g>, sum (E - A g)^2 = sum E^2 - <E, g>^2 / <g, g>.
    with np.errstate(invalid="ignore", divide="ignore"):
        residual = np.maximum(squares - inner**2 / gg, 0.0)
        spread = squares - flat.sum(1) ** 2 / npix
        r2 = 1.0 - residual / spread
    high = flat.max(1)  # constant: equal values and, where zeros lie outside, all zero
    constant = (high == flat.min(1)) & ((flat.shape[1] == npix) | (high == 0))
    return np.where(constant, math.nan, r2)


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
    x = _as_array(heatmap)
    c = _check_centre(centre, tuple(x.shape))
    rs = []
    for r in radii:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
            raise ValueError(f"radii must be finite numbers >= 0, got {r!r}")
        rs.append(r)
    if not rs:
        return {}
    fractions = _prof.disc_fractions(_one(x, c, disc_centre=c, radii=tuple(rs)))[0]
    return {r: float(f) for r, f in zip(rs, fractions)}


def gaussian_fit(
    heatmap: MapLike,
    *,
    rotated: bool = False,
    start: GaussianFit | None = None,
    check_unique: bool = True,
) -> GaussianFit:
    """Least-squares fit of a free-centre 2-D Gaussian to the map normalised to sum 1.

    OpenERF's protocol (``openerf.fit.fit_2d_gaussian``): the model
    ``A exp(-((x - xc)^2 / (2 sx^2) + (y - yc)^2 / (2 sy^2))) / (2 pi sx sy)`` is fitted to
    ``p = E / sum(E)`` over every pixel by least squares with a free amplitude and centre, and
    ``R² = 1 - Var(residual) / Var(p)``. Solved with ``scipy.optimize.least_squares``
    (MINPACK's Levenberg-Marquardt, analytic Jacobian, float64) on the map's support plus two
    residuals that stand exactly for every pixel outside it, started from the map's moments
    (or from ``start``). With ``rotated=True`` the covariance may also tilt (one more
    parameter, the correlation; fitted on the whole map). A fit whose sigma is below half a
    pixel, whose amplitude is not positive, or that has a second equally good optimum (a
    symmetric "+") is flagged ``degenerate`` and not ``converged``. See
    :mod:`erf_monitor.measure.fit`.

    Args:
        heatmap: non-negative 2-D ERF map.
        rotated: also fit the covariance's off-diagonal term.
        start: a fit to start from (e.g. the full map's fit for a bootstrap resample).
        check_unique: restart from stretched widths to detect a second optimum as good.

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
        >>> fit.converged, fit.degenerate
        (True, None)
    """
    x = _as_array(heatmap)
    if x.ndim != 2:
        raise ValueError(f"gaussian_fit needs a 2-D map, got shape {tuple(x.shape)}")
    with single_blas_thread():
        return fit_gaussian(x, rotated=rotated, start=start, check_unique=check_unique)


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
