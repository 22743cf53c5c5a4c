"""Bootstrap confidence intervals over probe images for every ERF metric.

An ERF map is a mean over a handful of probe images (published comparisons use 8 to 50), so
every number computed from it carries sampling noise. The nonparametric bootstrap estimates
it from the images themselves (Efron & Tibshirani 1993, ch. 13, percentile interval):

1. keep the per-sample maps ``P_n`` (``compute_erf(..., keep_per_sample=True)``);
2. draw ``n_boot`` resamples of the ``N`` images with replacement;
3. for each resample rebuild the published map exactly as the probe does
   (``finalise_map(sum of the resampled P_n, N, mode)``: the mean for ``"luo"``, the
   ``log10(x + 1) / max`` normalisation for ``"replknet"``) and recompute the metric on it
   with the library's own metric code;
4. the interval is made of two quantiles of the ``n_boot`` values: by default the
   bias-corrected and accelerated (BCa) ones (Efron 1987; Efron & Tibshirani ch. 14: the
   bias correction from the share of values below the full-sample value, the acceleration
   from the ``N`` leave-one-out maps), which keep their nominal coverage for skewed
   statistics of a mean map where the plain ``(1 - level) / 2`` and ``(1 + level) / 2``
   quantiles (``method="percentile"``) undercover. ``value`` is the metric of the map of
   all ``N`` images.

``str(interval)`` reads ``153 ± 6``: the value and half the interval's width. Metrics whose
values are discrete (``erf_size`` takes odd values, ``coverage`` and ``area_t*`` follow it)
get intervals made of those values; with few images they can be ``± 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

from erf_monitor.measure.result import ERFResult, axis_names

__all__ = ["Interval", "bootstrap_metrics", "metric_value", "paired_differences"]

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
    names = axis_names(result.heatmap.dim())
    per_axis: dict[str, Callable[[ERFResult], Sequence[float]]] = {
        "sigma_": lambda r: r.sigma,
        "centroid_offset_": lambda r: r.centroid_offset,
    }
    for prefix, get in per_axis.items():
        if key.startswith(prefix) and key[len(prefix) :] in names:
            return float(get(result)[names.index(key[len(prefix) :])])
    if key == "erf_size":
        return float(result.erf_size)
    if key == "coverage":
        return float(result.coverage)
    if key == "erf_trf_ratio":
        return float(result.ratio)
    if key == "gaussian_r2":
        return float(result.gaussian_r2)
    if key.startswith("area_t") and key[6:].isdigit():
        return float(result.area_ratio(int(key[6:]) / 100.0))
    return float(result.scalars()[key])


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
    _check(level, n_boot, method)
    sampler = _Resampler(result, metrics)
    gen = torch.Generator().manual_seed(seed)
    draws = [sampler.draw(gen) for _ in range(n_boot)]
    values = np.stack([sampler.values(c) for c in draws])
    jack = sampler.jackknife() if method == "bca" else None
    return _intervals(sampler.keys, sampler.full(), values, jack, level, n_boot)


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
    _check(level, n_boot, method)
    sa, sb = _Resampler(a, metrics), _Resampler(b, metrics)
    if sa.n != sb.n:
        raise ValueError(f"paired differences need the same probe images: {sa.n} vs {sb.n}")
    keys = [k for k in sa.keys if k in sb.keys]
    sa.keys = sb.keys = keys
    gen = torch.Generator().manual_seed(seed)
    draws = [sa.draw(gen) for _ in range(n_boot)]
    values = np.stack([sb.values(c) - sa.values(c) for c in draws])
    ja, jb = (sa.jackknife(), sb.jackknife()) if method == "bca" else (None, None)
    jack = jb - ja if ja is not None and jb is not None else None
    return _intervals(keys, sb.full() - sa.full(), values, jack, level, n_boot)


def _check(level: float, n_boot: int, method: str) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    if method not in ("bca", "percentile"):
        raise ValueError(f"method must be 'bca' or 'percentile', got {method!r}")


class _Resampler:
    """Rebuilds ``result``'s map from weighted per-sample maps and measures it."""

    def __init__(self, result: ERFResult, metrics: Sequence[str] | None) -> None:
        from erf_monitor.measure.metrics import finalise_map

        if result.per_sample is None:
            raise ValueError(
                f"layer {result.name!r} has no per-sample maps: compute it with "
                "compute_erf(..., keep_per_sample=True)"
            )
        maps = result.per_sample.detach().to("cpu", torch.float64)
        self.result, self.n, self.shape = result, maps.shape[0], maps.shape[1:]
        self.flat = maps.reshape(self.n, -1)
        self.finalise = finalise_map
        full = finalise_map(maps.sum(0), self.n, result.mode)
        scale = 1e-6 * float(full.max())
        if not torch.allclose(full, result.heatmap.float(), rtol=1e-4, atol=scale):
            raise ValueError(
                f"layer {result.name!r}: the per-sample maps do not add up to the ERF map "
                "(probed in train mode, or maps from another probe?)"
            )
        self.keys = (
            list(metrics)
            if metrics is not None
            else [k for k in result.scalars() if k not in _CONSTANT + _NOT_RESAMPLED]
        )
        unknown = [k for k in self.keys if k in _NOT_RESAMPLED]
        if unknown:
            raise ValueError(
                f"{unknown[0]!r} compares several positions' maps; bootstrap intervals are "
                "computed for one position's map at a time"
            )

    def draw(self, gen: torch.Generator) -> torch.Tensor:
        """How often each image is in one resample (``N`` draws with replacement)."""
        return torch.bincount(torch.randint(0, self.n, (self.n,), generator=gen), minlength=self.n)

    def _measure(self, total: torch.Tensor, n: int) -> np.ndarray:
        heat = self.finalise(total.reshape(self.shape), n, self.result.mode)
        replica = self.result.with_heatmap(heat)
        return np.array([metric_value(replica, k) for k in self.keys])

    def values(self, counts: torch.Tensor) -> np.ndarray:
        return self._measure(counts.to(torch.float64) @ self.flat, self.n)

    def full(self) -> np.ndarray:
        return np.array([metric_value(self.result, k) for k in self.keys])

    def jackknife(self) -> np.ndarray | None:
        """Metrics of the ``N`` leave-one-out maps (for the BCa acceleration)."""
        if self.n <= 2:
            return None
        total = self.flat.sum(0)
        return np.stack([self._measure(total - self.flat[i], self.n - 1) for i in range(self.n)])


def _intervals(
    keys: Sequence[str],
    full: np.ndarray,
    values: np.ndarray,
    jack: np.ndarray | None,
    level: float,
    n_boot: int,
) -> dict[str, Interval]:
    out: dict[str, Interval] = {}
    for j, key in enumerate(keys):
        col = values[:, j][np.isfinite(values[:, j])]
        value = float(full[j])
        if col.size < 2 or not math.isfinite(value):
            out[key] = Interval(value, math.nan, math.nan, math.nan, level, n_boot)
            continue
        qs = _quantile_levels(col, value, None if jack is None else jack[:, j], level)
        low, high = np.quantile(col, qs)
        out[key] = Interval(value, float(low), float(high), float(col.std(ddof=1)), level, n_boot)
    return out


def _quantile_levels(
    values: np.ndarray, full: float, jack: np.ndarray | None, level: float
) -> tuple[float, float]:
    """The two quantile levels of the interval: percentile, or BCa when ``jack`` is given."""
    lo, hi = (1.0 - level) / 2.0, (1.0 + level) / 2.0
    if jack is None or not np.isfinite(jack).all():
        return lo, hi
    normal = NormalDist()
    below = (np.count_nonzero(values < full) + 0.5 * np.count_nonzero(values == full)) / values.size
    below = min(max(below, 0.5 / values.size), 1.0 - 0.5 / values.size)
    z0 = normal.inv_cdf(below)
    d = jack.mean() - jack
    denom = 6.0 * float((d**2).sum()) ** 1.5
    a = float((d**3).sum()) / denom if denom > 0 else 0.0

    def adjusted(q: float) -> float:
        z = normal.inv_cdf(q)
        return normal.cdf(z0 + (z0 + z) / (1.0 - a * (z0 + z)))

    return adjusted(lo), adjusted(hi)
