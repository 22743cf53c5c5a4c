"""Bootstrap confidence intervals over probe images for every ERF metric.

An ERF map is a mean over a handful of probe images (published comparisons use 8 to 50), so
every number computed from it carries sampling noise. The nonparametric bootstrap estimates
it from the images themselves (Efron & Tibshirani 1993):

1. keep the per-sample maps ``P_n`` (``compute_erf(..., keep_per_sample=True)``);
2. draw ``n_boot`` resamples of the ``N`` images with replacement;
3. measure each resample's map, the one the probe would publish from those images
   (``finalise_map(sum of the resampled P_n, n, mode)``: the mean for ``"luo"``, the mass-1
   map for ``"openerf"``, ``log10(x + 1) / max`` for ``"replknet"``);
4. the interval is made of two quantiles of the ``n_boot`` values: by default the
   bias-corrected and accelerated (BCa) ones (Efron 1987; Efron & Tibshirani ch. 14: the
   bias correction from the share of values below the full-sample value, the acceleration
   from the ``N`` leave-one-out maps), which keep their nominal coverage for skewed
   statistics of a mean map where the plain ``(1 - level) / 2`` and ``(1 + level) / 2``
   quantiles (``method="percentile"``) undercover. ``value`` is the metric of the map of
   all ``N`` images.

Steps 2 and 4 are ``scipy.stats.bootstrap``'s: it resamples the image *indices*, and the
statistic turns each set of indices into image counts and measures that resample's map for
every metric at once (several maps too: :func:`paired_differences` and
:func:`compare_intervals` measure every model on the same resampled images). Step 3 is cheap:

* the mass and moment metrics (``erf_size``, ``coverage``, ``area_t*``, ``sigma_*``,
  ``centroid_offset_*``, ``disc_mass_r*``, principal axes, cross score, gridding period)
  depend on the map only through sums that are linear in it
  (:mod:`~erf_monitor.measure.profiles`); in the ``"luo"`` and ``"openerf"`` modes (a mean,
  or a sum scaled to mass 1, of the per-image maps) a resample's sums are the count-weighted
  sums of the images' sums: one matrix product for all resamples;
* the others (``gaussian_r2``, ``dead_fraction``, the Gaussian fit) are measured on the
  resample's map, built by one matrix product for a batch of resamples; the fits start from
  the full map's fit and run in threads;
* in the ``"replknet"`` mode the log makes the map non-linear in the images: every resample's
  map is built and measured.

Where BCa cannot be computed, SciPy returns NaN: when the leave-one-out values do not vary
(no acceleration can be estimated, common for ``erf_size``, which takes odd values only) or
every resample lies on one side of the full-sample value. There the bias correction alone is
used (acceleration 0, the share of values below clamped to ``[0.5 / n_boot, 1 - 0.5 /
n_boot]``); for a metric that does not vary at all that is the point ``[value, value]``.

``str(interval)`` reads ``153 ± 6``: the value and half the interval's width. Metrics whose
values are discrete (``erf_size`` takes odd values, ``coverage`` and ``area_t*`` follow it)
get intervals made of those values; with few images they can be ``± 0``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

from erf_monitor.core.threads import single_blas_thread
from erf_monitor.measure import profiles as _prof
from erf_monitor.measure.fit import GaussianFit, fit_gaussian
from erf_monitor.measure.metrics import COVERAGE_MASS, finalise_map, gaussian_r2_batch
from erf_monitor.measure.profiles import Profiles
from erf_monitor.measure.result import ERFResult, axis_names
from erf_monitor.measure.shape import cross_score_nd

__all__ = [
    "Interval",
    "bootstrap_metrics",
    "compare_intervals",
    "metric_value",
    "paired_differences",
]

#: Metrics that depend on the architecture only (no interval needed).
_CONSTANT = ("trf_size", "trf_size_clipped", "trf_global")
#: Metrics of other maps than the one resampled (the other positions of an ERF field).
_NOT_RESAMPLED = ("border_ratio",)


@dataclass(frozen=True)
class Interval:
    """A metric's value and its bootstrap percentile interval.

    Attributes:
        value: the metric of the map of all probe images.
        low: lower end of the interval.
        high: upper end of the interval.
        std: standard deviation of the bootstrap values (the bootstrap standard error).
        level: nominal coverage (0.95: a 95% interval).
        n_boot: number of resamples.
    """

    value: float
    low: float
    high: float
    std: float
    level: float
    n_boot: int

    @property
    def half_width(self) -> float:
        """Half the interval's width (the ``±`` of ``str(interval)``)."""
        return (self.high - self.low) / 2.0

    def covers(self, x: float) -> bool:
        """Whether ``low <= x <= high``."""
        return self.low <= x <= self.high

    def format(self, spec: str = ".3g") -> str:
        """``"<value> ± <half width>"`` with ``spec`` for both numbers."""
        if not math.isfinite(self.value):
            return "n/a"
        return f"{self.value:{spec}} ± {self.half_width:{spec}}"

    def __str__(self) -> str:
        return self.format()


def metric_value(result: ERFResult, key: str) -> float:
    """The metric ``key`` of ``result`` (a key of ``result.scalars()``), computing only it.

    Examples:
        >>> import torch, erf_monitor as em
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3))
        >>> r = em.compute_erf(net, torch.randn(2, 1, 9, 9), ["0"])["0"]
        >>> metric_value(r, "erf_size") == r.erf_size
        True
    """
    return float(result.scalars([key])[key])


def bootstrap_metrics(
    result: ERFResult,
    metrics: Sequence[str] | None = None,
    *,
    n_boot: int = 500,
    level: float = 0.95,
    seed: int = 0,
    method: str = "bca",
) -> dict[str, Interval]:
    """Bootstrap intervals over the probe images of ``result`` (see the module docstring).

    Args:
        result: a result computed with ``keep_per_sample=True``.
        metrics: keys of ``result.scalars()``; default: all of them except the TRF sizes.
        n_boot: number of resamples.
        level: nominal coverage of the intervals, in ``(0, 1)``.
        seed: seed of the resampling (a private generator; no global RNG is touched).
        method: ``"bca"`` (bias-corrected and accelerated) or ``"percentile"``.

    Returns:
        ``{metric: Interval}``.

    Raises:
        ValueError: without per-sample maps, or if they do not add up to ``result.heatmap``.

    Examples:
        >>> import torch, erf_monitor as em
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(4, 4, 3, dilation=2))
        >>> r = em.compute_erf(net, torch.randn(16, 1, 33, 33), ["2"], keep_per_sample=True)
        >>> ci = bootstrap_metrics(r["2"], ["sigma_x"], n_boot=200)["sigma_x"]
        >>> ci.low <= ci.value <= ci.high
        True
    """
    return compare_intervals([result], metrics, n_boot=n_boot, level=level, seed=seed,
                             method=method)[0][0]  # fmt: skip


def paired_differences(
    a: ERFResult,
    b: ERFResult,
    metrics: Sequence[str] | None = None,
    *,
    n_boot: int = 500,
    level: float = 0.95,
    seed: int = 0,
    method: str = "bca",
) -> dict[str, Interval]:
    """Intervals of ``metric(b) - metric(a)`` for two models probed on the **same** images.

    Each resample draws one set of images and applies it to both models, so what the images
    have in common cancels: the interval says whether ``b``'s ERF really differs from
    ``a``'s on this probe set (an interval excluding 0), not just whether each is noisy.

    Args:
        a: the reference result (``keep_per_sample=True``).
        b: the other result, same layer geometry, same probe images in the same order.
        metrics: keys of ``scalars()``; default: all but the TRF sizes.
        n_boot: number of resamples.
        level: nominal coverage.
        seed: seed of the resampling.
        method: ``"bca"`` or ``"percentile"``.

    Returns:
        ``{metric: Interval}`` of the differences (``value``: the difference of the full maps).

    Raises:
        ValueError: if the two were not probed on the same number of images.
    """
    return compare_intervals([a, b], metrics, n_boot=n_boot, level=level, seed=seed,
                             method=method)[1][0]  # fmt: skip


def compare_intervals(
    results: Sequence[ERFResult],
    metrics: Sequence[str] | None = None,
    *,
    n_boot: int = 500,
    level: float = 0.95,
    seed: int = 0,
    method: str = "bca",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Interval]], list[dict[str, Interval]]]:
    """Intervals of every result's metrics, and of each result's paired difference to the
    first, all from **one** set of resampled images (every map measured once per resample).

    Args:
        results: results of several models at one layer, probed on the same images
            (``keep_per_sample=True``); the first is the reference of the differences.
        metrics: keys of ``scalars()``; default: all but the TRF sizes (those every result
            has).
        n_boot: number of resamples.
        level: nominal coverage.
        seed: seed of the resampling.
        method: ``"bca"`` or ``"percentile"``.
        on_batch: called with the number of resamples measured after each batch (progress
            displays); ``n_boot + N + 1`` in all (resamples, leave-one-out maps, full map).

    Returns:
        ``(intervals, differences)``: one ``{metric: Interval}`` per result, and one per
        result after the first, of ``metric(result) - metric(results[0])``.

    Raises:
        ValueError: without per-sample maps, or results probed on different numbers of images.
    """
    _check(level, n_boot, method)
    samplers = [_Resampler(r, metrics) for r in results]
    n = samplers[0].n
    if any(s.n != n for s in samplers):
        counts = [s.n for s in samplers]
        raise ValueError(f"paired differences need the same probe images: {counts} images")
    keys = [k for k in samplers[0].keys if all(k in s.keys for s in samplers)]
    for s in samplers:
        s.keys = keys
    m, k = len(samplers), len(keys)
    fulls = [s.full() for s in samplers]
    full = np.concatenate(fulls + [f - fulls[0] for f in fulls[1:]])

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        lead = idx.shape[:-1]
        counts = _counts(idx.reshape(-1, idx.shape[-1]), n)
        values = [s.values(counts) for s in samplers]  # (B, k) each
        out = np.concatenate(values + [v - values[0] for v in values[1:]], axis=1)
        if on_batch is not None:
            on_batch(counts.shape[0])
        return np.moveaxis(out.reshape((*lead, out.shape[1])), -1, 0)

    low, high, std = _bootstrap(statistic, full, n, n_boot, level, method, seed)
    cis = [
        {
            key: Interval(
                float(full[j]), float(low[j]), float(high[j]), float(std[j]), level, n_boot
            )
            for j, key in enumerate(keys, start=i * k)
        }
        for i in range(2 * m - 1)
    ]
    return cis[:m], cis[m:]


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each of the ``n`` images is in each resample (rows of ``idx``)."""
    b = idx.shape[0]
    keys = (idx + n * np.arange(b)[:, None]).reshape(-1)
    return np.bincount(keys, minlength=b * n).reshape(b, n).astype(np.float64)


def _bootstrap(
    statistic: Callable[..., np.ndarray],
    full: np.ndarray,
    n: int,
    n_boot: int,
    level: float,
    method: str,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``scipy.stats.bootstrap`` over the image indices; the fallbacks of the module docs."""
    if n < 2:  # one image: every resample is the map itself
        return full.copy(), full.copy(), np.zeros_like(full)
    from scipy import stats

    with warnings.catch_warnings(), single_blas_thread():  # degenerate BCa: handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(
            (np.arange(n),),
            statistic,
            n_resamples=n_boot,
            vectorized=True,
            confidence_level=level,
            method="BCa" if method == "bca" else "percentile",
            rng=np.random.default_rng(seed),
            batch=_BATCH,
        )
    low = np.array(res.confidence_interval.low, dtype=np.float64, ndmin=1)
    high = np.array(res.confidence_interval.high, dtype=np.float64, ndmin=1)
    values = np.asarray(res.bootstrap_distribution, dtype=np.float64).reshape(full.size, -1)
    std = np.full(full.size, math.nan)
    for j in range(full.size):
        col = values[j][np.isfinite(values[j])]
        if col.size >= 2:
            std[j] = col.std(ddof=1)
        if not math.isfinite(full[j]) or col.size < 2:
            low[j] = high[j] = math.nan
        elif not (math.isfinite(low[j]) and math.isfinite(high[j])):
            qs = _bias_corrected(col, float(full[j]), level, method)
            low[j], high[j] = np.quantile(col, qs)
    return low, high, std


def _bias_corrected(
    values: np.ndarray, full: float, level: float, method: str
) -> tuple[float, float]:
    """Quantile levels where SciPy's cannot be computed: bias-corrected only (acceleration 0)
    with the share of values below ``full`` clamped, or the plain percentile levels."""
    lo, hi = (1.0 - level) / 2.0, (1.0 + level) / 2.0
    if method != "bca":
        return lo, hi
    normal = NormalDist()
    below = (np.count_nonzero(values < full) + 0.5 * np.count_nonzero(values == full)) / values.size
    below = min(max(below, 0.5 / values.size), 1.0 - 0.5 / values.size)
    z0 = normal.inv_cdf(below)
    return normal.cdf(2 * z0 + normal.inv_cdf(lo)), normal.cdf(2 * z0 + normal.inv_cdf(hi))


def _check(level: float, n_boot: int, method: str) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    if method not in ("bca", "percentile"):
        raise ValueError(f"method must be 'bca' or 'percentile', got {method!r}")


#: Resamples per call of the statistic (the draws do not depend on it: SciPy draws each batch
#: from the same generator in turn).
_BATCH = 50
#: Resample maps held at once (float64 values) when a metric needs the maps themselves.
_MAP_BUDGET = 1 << 24


class _Resampler:
    """Measures ``result``'s metrics on resamples of its probe images, given as image counts.

    Rows of ``counts`` are resamples; ``values(counts)`` returns one row of metrics each.
    """

    def __init__(self, result: ERFResult, metrics: Sequence[str] | None) -> None:
        if result.per_sample is None:
            raise ValueError(
                f"layer {result.name!r} has no per-sample maps: compute it with "
                "compute_erf(..., keep_per_sample=True)"
            )
        per_sample = result.per_sample.detach().to("cpu", torch.float64)
        self.result, self.n, self.shape = result, per_sample.shape[0], tuple(per_sample.shape[1:])
        full = finalise_map(per_sample.sum(0), self.n, result.mode)
        scale = 1e-6 * float(full.max())
        if not torch.allclose(full, result.heatmap.float(), rtol=1e-4, atol=scale):
            raise ValueError(
                f"layer {result.name!r}: the per-sample maps do not add up to the ERF map "
                "(probed in train mode, or maps from another probe?)"
            )
        self.raw = per_sample.reshape(self.n, -1).numpy()
        shift = result._frame.shift
        framed = per_sample.numpy()
        if any(shift):  # the metrics' frame: rolled where the field wraps around the input
            framed = np.roll(framed, shift, axis=tuple(range(1, framed.ndim)))
        self.flat = framed.reshape(self.n, -1)
        self.geometry = result._geometry
        # mean or mass-1 map: a resample's linear sums are count-weighted sums of the images'
        self.images = Profiles(self.geometry, framed) if result.mode != "replknet" else None
        getters = result._getters()
        self.keys = (
            list(metrics)
            if metrics is not None
            else [k for k in getters if k not in _CONSTANT + _NOT_RESAMPLED]
        )
        unknown = [k for k in self.keys if k in _NOT_RESAMPLED]
        if unknown:
            raise ValueError(
                f"{unknown[0]!r} compares several positions' maps; bootstrap intervals are "
                "computed for one position's map at a time"
            )
        missing = [k for k in self.keys if k not in getters]
        if missing:
            raise KeyError(f"layer {result.name!r} has no metric {missing[0]!r}")

    def full(self) -> np.ndarray:
        """The metrics of the map of all images, as ``result.scalars()`` gives them."""
        values = self.result.scalars(self.keys)
        return np.array([values[k] for k in self.keys], dtype=np.float64)

    def values(self, counts: np.ndarray | torch.Tensor) -> np.ndarray:
        """Metrics ``(B, k)`` of the resamples whose image counts are the rows of ``counts``
        (a single row of counts: ``(k,)``)."""
        c = np.asarray(counts, dtype=np.float64)
        if c.ndim == 1:
            return self.values(c[None])[0]
        rows = max(1, _MAP_BUDGET // max(self.flat.shape[1], 1))
        if c.shape[0] > rows:  # bound the memory of the resample maps
            return np.concatenate([self.values(c[i : i + rows]) for i in range(0, len(c), rows)])
        batch = _Batch(self, c)
        return np.stack([batch.column(k) for k in self.keys], axis=1)


_CONSTANT = ("trf_size", "trf_size_clipped", "trf_global")
_NOT_RESAMPLED = ("border_ratio",)
_PER_AXIS = re.compile(r"(sigma|centroid_offset|gauss_fit_sigma|gauss_fit_offset|"
                       r"gridding_period)_([zyx])$")  # fmt: skip


class _Batch:
    """One batch of resamples: their profiles and (built on first use) maps."""

    def __init__(self, sampler: _Resampler, counts: np.ndarray) -> None:
        self.s, self.counts = sampler, counts
        self.n = counts.sum(1)  # images per resample
        self._maps: np.ndarray | None = None
        self._fits: list[GaussianFit] | None = None
        images = sampler.images
        if images is None:
            self.profiles = Profiles(sampler.geometry, self.maps)
        else:
            parts = ["total", "cube", "marginals", "box_marginals", "cross", "disc"]
            if len(sampler.shape) == 2:
                parts.append("tails")
            self.profiles = images.combine(counts, [p for p in parts if self._needs(p)])

    def _needs(self, part: str) -> bool:
        keys = self.s.keys
        if part in ("total", "marginals"):
            return True
        if part == "cube":
            return any(k in _EXTENT or k.startswith("area_t") for k in keys)
        if part == "box_marginals":
            return any(k.startswith("gridding_period_") for k in keys)
        if part == "cross":
            return any(k in _PRINCIPAL for k in keys)
        if part == "disc":
            return any(k.startswith("disc_mass_r") for k in keys)
        return "cross_score" in keys  # tails

    @property
    def maps(self) -> np.ndarray:
        """The resamples' published maps in the metrics' frame ``(B, *S)``, float64."""
        if self._maps is None:
            total = self.counts @ self.s.flat
            mode = self.s.result.mode
            if mode == "replknet":  # log10(mean + 1) / max, as finalise_map
                logged = np.log1p(total / self.n[:, None])
                peak = logged.max(1, keepdims=True)
                with np.errstate(invalid="ignore", divide="ignore"):
                    total = np.where(peak > 0, logged / peak, 0.0)
            else:  # the mean or the mass-1 map: the metrics do not depend on the scale
                total = total / self.n[:, None]
            self._maps = total.reshape((-1, *self.s.shape))
        return self._maps

    def column(self, key: str) -> np.ndarray:
        p, r = self.profiles, self.s.result
        box = r._frame.box
        names = axis_names(len(self.s.shape))
        per_axis = _PER_AXIS.match(key)
        if per_axis and per_axis.group(2) in names:
            what, axis = per_axis.group(1), names.index(per_axis.group(2))
            if what == "sigma":
                return np.sqrt(_prof.moments(p)[1][:, axis])
            if what == "centroid_offset":
                return _prof.moments(p)[0][:, axis] - r._frame.centre[axis]
            if what == "gridding_period":
                return _prof.gridding_period(p)[:, axis].astype(np.float64)
            fits = self.fits()
            if what == "gauss_fit_sigma":
                return np.array([f.sigma[axis] for f in fits])
            return np.array([f.centre[axis] - r._frame.centre[axis] for f in fits])
        if key in _EXTENT or key.startswith("area_t"):
            return self._extent(key)
        if key in _PRINCIPAL:
            widths, angle = _prof.principal_axes(p)
            return {
                "sigma_major": widths[:, 0],
                "sigma_minor": widths[:, -1],
                "anisotropy": _prof.anisotropy(widths),
                "axis_angle": angle,
            }[key]
        if key.startswith("disc_mass_r"):
            radius = float(key[len("disc_mass_r") :])
            k = [float(x) for x in self.s.geometry.radii].index(radius)
            return _prof.disc_fractions(p)[:, k]
        if key == "gaussian_r2":
            mus, variances = _prof.moments(p)
            return gaussian_r2_batch(self.maps, mus, variances)  # the maps: not windowed
        if key == "cross_score" and len(self.s.shape) == 2:
            return _prof.cross_score_2d(p)
        if key == "cross_score":
            c = self.s.geometry.centre
            return np.array([cross_score_nd(m, c) for m in self.maps])
        if key == "dead_fraction":
            if box is None:
                return np.full(self.counts.shape[0], math.nan)
            window = (slice(None), *(slice(lo, hi + 1) for lo, hi in box))
            inside = self.maps[window]
            return np.count_nonzero(inside == 0, axis=tuple(range(1, inside.ndim))) / (
                inside[0].size
            )
        if key in ("gauss_fit_amplitude", "gauss_fit_r2"):
            return np.array([getattr(f, key[len("gauss_fit_") :]) for f in self.fits()])
        if key.startswith("trf_"):  # the architecture's, the same for every resample
            return np.full(self.counts.shape[0], r.scalars([key])[key])
        return self._generic(key)

    def _extent(self, key: str) -> np.ndarray:
        p, r = self.profiles, self.s.result
        if key.startswith("area_t"):
            return _prof.area_ratio(p, int(key[len("area_t") :]) / 100.0)
        radius = _prof.extent_radius(p, COVERAGE_MASS)
        size = np.where(radius < 0, 0, 2 * radius + 1).astype(np.float64)
        if key == "erf_size":
            return size
        if key == "erf_trf_ratio":
            return size / max(r.trf.clipped_size) if r.trf is not None else size * math.nan
        if key == "coverage_trf":
            box = r._frame.box
            if box is None:
                return np.full(size.shape, math.nan)
            return _prof.coverage_within(p, COVERAGE_MASS, box)
        coverage = _prof.area_ratio(p, COVERAGE_MASS)
        if key == "coverage":
            return coverage
        volume = np.rint(coverage * math.prod(self.s.shape))  # erf_size_visible
        nd = len(self.s.shape)
        return np.sqrt(volume) if nd == 2 else volume ** (1.0 / nd)

    def fits(self) -> list[GaussianFit]:
        """Each resample's Gaussian fit, started from the full map's."""
        if self._fits is None:
            start = self.s.result._frame_fit(False)
            self._fits = [fit_gaussian(m, start=start, check_unique=False) for m in self.maps]
        return self._fits

    def _generic(self, key: str) -> np.ndarray:
        """Any other metric: each resample's map measured as a result of its own."""
        r = self.s.result
        out = []
        for c, n in zip(self.counts, self.n):
            total = torch.from_numpy(c @ self.s.raw).reshape(self.s.shape)
            heat = finalise_map(total, int(n), r.mode)
            out.append(r.with_heatmap(heat).scalars([key])[key])
        return np.array(out, dtype=np.float64)


_EXTENT = ("erf_size", "erf_trf_ratio", "coverage", "coverage_trf", "erf_size_visible")
_PRINCIPAL = ("sigma_major", "sigma_minor", "anisotropy", "axis_angle")
