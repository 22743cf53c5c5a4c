"""Linear summaries of ERF maps ("profiles") and the metrics computed from them.

Most metrics of a map depend on it only through a few sums that are *linear* in the map:
the mass at each Chebyshev distance from the centre pixel (mass squares), the marginal
profiles (centroid, sigma), the mass in each disc (OpenERF's radial mass), the second moments
(principal axes) and, in 2-D, the mass beyond each pair of distances from the centre row and
column (cross score). A :class:`Profiles` holds those sums for a batch of maps ``(B, *S)``;
the metric functions below work on it, batched over ``B``.

Because the sums are linear, the profiles of a weighted sum of maps are the weighted sums of
their profiles (:meth:`Profiles.combine`): the bootstrap computes every image's profiles once
and gets those of all resamples with one matrix product, instead of rebuilding and
re-measuring each resample's map. One code path serves both: a single map is a batch of one.

Everything is NumPy float64; positions are pixel indices, ``centre`` the integer pixel on
which mass squares are centred, ``disc_centre`` the one on which discs are centred.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import numpy as np

__all__ = ["Geometry", "Profiles"]

Box = tuple[tuple[int, int], ...]


class Geometry(NamedTuple):
    """Where the metrics of a map are measured: the same for a map and its resamples."""

    shape: tuple[int, ...]
    centre: tuple[int, ...]
    disc_centre: tuple[int, ...] = ()
    radii: tuple[float, ...] = ()
    box: Box | None = None


@lru_cache(maxsize=16)
def _distance_index(shape: tuple[int, ...], centre: tuple[int, ...]) -> np.ndarray:
    """Chebyshev distance of every pixel (flattened) to ``centre`` (cached: a monitor
    measures the same geometry at every probe)."""
    dist = np.zeros((), dtype=np.int64)
    for d, (c, s) in enumerate(zip(centre, shape)):
        view = [1] * len(shape)
        view[d] = s
        dist = np.maximum(dist, np.abs(np.arange(s) - c).reshape(view))
    out = np.broadcast_to(dist, shape).reshape(-1)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=16)
def _disc_index(
    shape: tuple[int, ...], centre: tuple[int, ...], radii: tuple[float, ...]
) -> np.ndarray:
    """Per pixel (flattened), the index of the smallest of the sorted ``radii`` whose disc
    holds it (``len(radii)``: outside every disc)."""
    d2 = np.zeros((), dtype=np.float64)
    for d, (c, s) in enumerate(zip(centre, shape)):
        view = [1] * len(shape)
        view[d] = s
        d2 = d2 + ((np.arange(s, dtype=np.float64) - c) ** 2).reshape(view)
    r2 = np.sort(np.asarray(radii, dtype=np.float64)) ** 2
    out = np.searchsorted(r2, np.broadcast_to(d2, shape).reshape(-1), side="left")
    out.flags.writeable = False
    return out


def _grouped_sum(flat: np.ndarray, index: np.ndarray, groups: int) -> np.ndarray:
    """``out[b, g] = sum of flat[b, p] over the pixels p with index[p] == g``."""
    b = flat.shape[0]
    if b == 1:
        return np.bincount(index, weights=flat[0], minlength=groups)[None, :]
    keys = (index[None, :] + groups * np.arange(b)[:, None]).reshape(-1)
    return np.bincount(keys, weights=flat.reshape(-1), minlength=b * groups).reshape(b, groups)


def fold(profile: np.ndarray, c: int) -> np.ndarray:
    """Mass of a batch of 1-D profiles ``(B, S)`` by distance ``|i - c|`` (``(B, D)``)."""
    s = profile.shape[-1]
    out = np.zeros((*profile.shape[:-1], max(c, s - 1 - c) + 1), dtype=np.float64)
    out[..., 0] = profile[..., c]
    out[..., 1 : s - c] += profile[..., c + 1 :]
    out[..., 1 : c + 1] += profile[..., c - 1 :: -1] if c > 0 else 0.0
    return out


def _fold2d(maps: np.ndarray, c: Sequence[int]) -> np.ndarray:
    """A batch of 2-D maps ``(B, H, W)`` folded onto ``(|dy|, |dx|)``."""
    rows = np.moveaxis(fold(np.moveaxis(maps, 1, -1), c[0]), -1, 1)
    return fold(rows, c[1])


Part = np.ndarray | tuple[np.ndarray, ...]


@dataclass
class Profiles:
    """Linear summaries of a batch of maps ``(B, *S)``, each computed on first use.

    Parts (all linear in the maps, leading dim ``B``):

    * ``total``: the mass;
    * ``cube``: mass at each Chebyshev distance ``0 .. R-1`` from ``geometry.centre``;
    * ``marginals``: one profile per axis (the map summed over the other axes);
    * ``box_marginals``: the same inside ``geometry.box``;
    * ``cross``: ``sum E * d_a * d_b`` over pixels, ``d`` the offset from the centre, for
      every pair of axes ``a < b``;
    * ``disc``: mass in each disc of ``geometry.radii`` around ``geometry.disc_centre``;
    * ``tails`` (2-D): ``T[a, b]``, the mass with ``|dy| >= a`` and ``|dx| >= b``.
    """

    geometry: Geometry
    maps: np.ndarray | None  # (B, *S) float64; None for combined profiles
    parts: dict[str, Part] = field(default_factory=dict)
    _window: tuple[slice, ...] | None = field(default=None, repr=False)

    def get(self, name: str) -> np.ndarray:
        part = self._get(name)
        assert isinstance(part, np.ndarray)
        return part

    def axes(self, name: str) -> tuple[np.ndarray, ...]:
        part = self._get(name)
        assert isinstance(part, tuple)
        return part

    def _get(self, name: str) -> Part:
        if name not in self.parts:
            if self.maps is None:
                raise KeyError(f"profile part {name!r} was not combined")
            self.parts[name] = self._compute(name, self.maps)
        return self.parts[name]

    @property
    def window(self) -> tuple[slice, ...]:
        """The bounding box of the maps' non-zero pixels (all maps of the batch; the whole
        map when all are zero): everything outside it is zero, so every sum but the
        marginals runs on it alone, and costs the field's area, not the map's."""
        if self._window is None:
            cut = []
            for m, s in zip(self.axes("marginals"), self.geometry.shape):
                live = np.flatnonzero(m.any(0))
                cut.append(slice(int(live[0]), int(live[-1]) + 1) if live.size else slice(0, s))
            self._window = tuple(cut)
        return self._window

    @property
    def windowed(self) -> np.ndarray:
        """The maps on :attr:`window` ``(B, *w)``."""
        assert self.maps is not None
        index = (slice(None), *self.window)
        return self.maps[index]

    def _windowed_index(self, index: np.ndarray) -> np.ndarray:
        """A per-pixel index map (flattened over the map) restricted to :attr:`window`."""
        return np.ascontiguousarray(index.reshape(self.geometry.shape)[self.window]).reshape(-1)

    def _compute(self, name: str, maps: np.ndarray) -> Part:
        g = self.geometry
        b, nd = maps.shape[0], len(g.shape)
        if name == "marginals":  # the one sum over the whole map: it finds the window
            return tuple(_marginal(maps, d) for d in range(nd))
        if name == "total":
            return self.axes("marginals")[0].sum(1)
        view = self.windowed
        flat = view.reshape(b, -1)
        lows = [w.start for w in self.window]
        if name == "cube":
            index = _distance_index(tuple(g.shape), tuple(g.centre))
            return _grouped_sum(flat, self._windowed_index(index), int(index.max()) + 1)
        if name == "box_marginals":
            box = g.box if g.box is not None else tuple((0, s - 1) for s in g.shape)
            margins = []
            for d in range(nd):  # the window's marginal, inside the box of the other axes
                inside = [
                    slice(max(lo, w.start) - w.start, max(min(hi + 1, w.stop) - w.start, 0))
                    if k != d
                    else slice(None)
                    for k, ((lo, hi), w) in enumerate(zip(box, self.window))
                ]
                cut = (slice(None), *inside)
                m = np.zeros((b, g.shape[d]))
                m[:, self.window[d]] = _marginal(view[cut], d)
                lo, hi = max(box[d][0], 0), min(box[d][1], g.shape[d] - 1)
                margins.append(m[:, lo : hi + 1])
            return tuple(margins)
        if name == "cross":
            pairs = []
            for a in range(nd):
                for c in range(a + 1, nd):
                    summed = tuple(1 + k for k in range(nd) if k not in (a, c))
                    pair = view.sum(axis=summed) if summed else view
                    da = np.arange(lows[a], lows[a] + view.shape[1 + a]) - float(g.centre[a])
                    dc = np.arange(lows[c], lows[c] + view.shape[1 + c]) - float(g.centre[c])
                    pairs.append((pair @ dc) @ da)
            return np.stack(pairs, axis=1) if pairs else np.zeros((b, 0))
        if name == "disc":
            if not g.radii:
                return np.zeros((b, 0))
            index = _disc_index(tuple(g.shape), tuple(g.disc_centre or g.centre), tuple(g.radii))
            groups = len(g.radii) + 1
            bins = _grouped_sum(flat, self._windowed_index(index), groups)[:, :-1].cumsum(1)
            order = np.argsort(np.asarray(g.radii, dtype=np.float64), kind="stable")
            placed = np.empty_like(bins)
            placed[:, order] = bins
            return placed
        if name == "tails":
            if nd != 2:
                raise ValueError("tails are defined for 2-D maps")
            folded = _fold2d(maps, g.centre)
            rev = folded[:, ::-1, ::-1].cumsum(1).cumsum(2)[:, ::-1, ::-1]
            return np.ascontiguousarray(rev)
        raise KeyError(name)

    def combine(self, weights: np.ndarray, names: Sequence[str]) -> Profiles:
        """The profiles of ``weights @ maps`` (``weights``: ``(M, B)``), for the parts
        ``names`` (computed here first if needed)."""
        parts: dict[str, Part] = {}
        for name in names:
            value = self._get(name)
            if isinstance(value, tuple):
                parts[name] = tuple(weights @ v for v in value)
            else:
                arr = np.asarray(value)
                parts[name] = (weights @ arr.reshape(arr.shape[0], -1)).reshape(
                    (weights.shape[0], *arr.shape[1:])
                )
        return Profiles(self.geometry, None, parts)


def _marginal(maps: np.ndarray, d: int) -> np.ndarray:
    others = tuple(1 + k for k in range(maps.ndim - 1) if k != d)
    return maps.sum(axis=others) if others else maps


# --------------------------------------------------------------------------------------------
# Metrics from profiles, batched over B
# --------------------------------------------------------------------------------------------
def extent_radius(p: Profiles, t: float) -> np.ndarray:
    """Smallest radius whose centred cube holds more than ``t`` of the mass (``-1``: zero map)."""
    cum = p.get("cube").cumsum(1)
    return _first_above(cum, t)


def _first_above(cum: np.ndarray, t: float) -> np.ndarray:
    total = cum[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        hit = cum / total > t
    # the last radius covers the whole map (fraction exactly 1 > t); keep it as the fallback
    radius = np.where(hit.any(1), hit.argmax(1), cum.shape[1] - 1)
    return np.where(total[:, 0] > 0, radius, -1)


def extent_radius_per_axis(p: Profiles, t: float) -> list[np.ndarray]:
    g = p.geometry
    return [
        _first_above(fold(m, g.centre[d]).cumsum(1), t) for d, m in enumerate(p.axes("marginals"))
    ]


def cube_volume(g: Geometry, radius: np.ndarray, box: Box | None = None) -> np.ndarray:
    """Pixels of the cube of each radius around ``g.centre``, clipped to ``box`` (or the map)."""
    box = box if box is not None else tuple((0, s - 1) for s in g.shape)
    volume = np.ones(radius.shape, dtype=np.int64)
    for c, (lo, hi) in zip(g.centre, box):
        volume *= np.maximum(np.minimum(c + radius, hi) - np.maximum(c - radius, lo) + 1, 0)
    return np.where(radius >= 0, volume, 0)


def area_ratio(p: Profiles, t: float) -> np.ndarray:
    return cube_volume(p.geometry, extent_radius(p, t)) / math.prod(p.geometry.shape)


def coverage_within(p: Profiles, t: float, box: Box) -> np.ndarray:
    g = p.geometry
    size = math.prod(max(min(hi, s - 1) - max(lo, 0) + 1, 0) for (lo, hi), s in zip(box, g.shape))
    clipped = tuple((max(lo, 0), min(hi, s - 1)) for (lo, hi), s in zip(box, g.shape))
    radius = extent_radius(p, t)
    if size == 0:
        return np.full(radius.shape, math.nan)
    return cube_volume(g, radius, clipped) / size


def moments(p: Profiles) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis centroid and variance ``(B, nd)`` (NaN for zero maps); an axis whose
    marginal has a single non-zero entry has that index as centroid and variance exactly 0."""
    mus, variances = [], []
    for m in p.axes("marginals"):
        idx = np.arange(m.shape[1], dtype=np.float64)
        total = m.sum(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            mu = (m @ idx)[:, None] / total
            var = ((idx[None, :] - mu) ** 2 * m).sum(1, keepdims=True) / total
        single = np.count_nonzero(m > 0, axis=1) == 1
        mu = np.where(single[:, None], (m > 0).argmax(1)[:, None].astype(np.float64), mu)
        var = np.where(single[:, None], 0.0, np.maximum(var, 0.0))
        mus.append(mu[:, 0])
        variances.append(var[:, 0])
    return np.stack(mus, 1), np.stack(variances, 1)


def covariance(p: Profiles) -> np.ndarray:
    """The ``(B, nd, nd)`` covariance of each map over its pixel indices (NaN: zero map)."""
    g = p.geometry
    mus, variances = moments(p)
    nd = len(g.shape)
    total = p.get("total")
    cross = p.get("cross")
    cov = np.zeros((mus.shape[0], nd, nd))
    k = 0
    off = mus - np.asarray(g.centre, dtype=np.float64)
    for a in range(nd):
        cov[:, a, a] = variances[:, a]
        for c in range(a + 1, nd):
            with np.errstate(invalid="ignore", divide="ignore"):
                cov[:, a, c] = cov[:, c, a] = cross[:, k] / total - off[:, a] * off[:, c]
            k += 1
    return cov


def principal_axes(p: Profiles) -> tuple[np.ndarray, np.ndarray]:
    """Widths ``(B, nd)`` along the principal axes (largest first) and, in 2-D, the major
    axis' angle in degrees in ``(-90, 90]`` (NaN otherwise); NaN rows for zero maps."""
    cov = covariance(p)
    b, nd = cov.shape[0], cov.shape[1]
    widths = np.full((b, nd), math.nan)
    angle = np.full(b, math.nan)
    ok = np.isfinite(cov).all(axis=(1, 2))
    if ok.any():
        values = np.linalg.eigvalsh(cov[ok])[:, ::-1]  # descending
        # A degenerate axis (a line) is exactly 0, not rounding noise of order 1e-32.
        values = np.where(values > 1e-12 * values[:, :1], values, 0.0)
        widths[ok] = np.sqrt(values)
        if nd == 2:
            a = 0.5 * np.degrees(np.arctan2(2 * cov[ok, 0, 1], cov[ok, 1, 1] - cov[ok, 0, 0]))
            angle[ok] = np.where(a <= -90.0, a + 180.0, a)
    return widths, angle


def anisotropy(widths: np.ndarray) -> np.ndarray:
    """Largest over smallest width per row: 1 isotropic, ``inf`` for a line, NaN if zero."""
    big, small = widths.max(1), widths.min(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = big / small
    ratio = np.where(small == 0.0, np.where(big > 0.0, math.inf, math.nan), ratio)
    return np.where(np.isnan(widths).any(1), math.nan, ratio)


def disc_fractions(p: Profiles) -> np.ndarray:
    """Mass fraction in each disc of ``geometry.radii`` (``(B, len(radii))``, NaN: zero map)."""
    total = p.get("total")[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, p.get("disc") / total, math.nan)


def cross_score_2d(p: Profiles) -> np.ndarray:
    """The cross score ``1 - E(O) / E0(O)`` of 2-D maps (see :mod:`~erf_monitor.measure.shape`)."""
    g = p.geometry
    total = p.get("total")
    h, beyond = [], []
    for d, m in enumerate(p.axes("marginals")):
        by_dist = fold(m, g.centre[d])
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = by_dist.cumsum(1) / total[:, None]
        hd = (frac >= 0.5 - 1e-12).argmax(1)
        h.append(hd)
        # mass with |d| > h: the total minus the cumulative mass up to h
        beyond.append(np.clip(1.0 - np.take_along_axis(frac, hd[:, None], 1)[:, 0], 0.0, None))
    off = _off_axis_mass(p, h[0], h[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        observed = off / total
        expected = beyond[0] * beyond[1]
        score = 1.0 - observed / expected
    score = np.where(expected <= 1e-12, 0.0, score)
    return np.where(total > 0, score, math.nan)


def _off_axis_mass(p: Profiles, hy: np.ndarray, hx: np.ndarray) -> np.ndarray:
    """Mass with ``|dy| > hy`` and ``|dx| > hx``: from the tails table of combined profiles,
    else summed over the four corners of each map (no table needed for one map)."""
    if p.maps is None or "tails" in p.parts:
        tails = p.get("tails")
        rows = np.arange(hy.shape[0])
        iy, ix = hy + 1, hx + 1
        inside = (iy < tails.shape[1]) & (ix < tails.shape[2])
        return np.where(
            inside,
            tails[rows, np.minimum(iy, tails.shape[1] - 1), np.minimum(ix, tails.shape[2] - 1)],
            0.0,
        )
    cy, cx = p.geometry.centre
    out = np.zeros(hy.shape[0])
    for b, m in enumerate(p.maps):
        ys = (slice(0, max(cy - hy[b], 0)), slice(cy + hy[b] + 1, None))
        xs = (slice(0, max(cx - hx[b], 0)), slice(cx + hx[b] + 1, None))
        out[b] = sum(float(m[y, x].sum()) for y in ys for x in xs)
    return out


def gridding_period(p: Profiles) -> np.ndarray:
    """Per row and axis, the period of the live/dead pattern of the box marginals (``(B, nd)``)."""
    out = []
    for m in p.axes("box_marginals"):
        live = (m > 0).astype(np.float64)
        b, n = live.shape
        period = np.ones(b, dtype=np.int64)
        if n >= 2:
            # mismatches(q) = #{i < n - q: live[i] != live[i + q]}
            #               = sum live[:n-q] + sum live[q:] - 2 * sum live[i] live[i + q],
            # the last sum an autocorrelation (exact integers after rounding the FFT's)
            spec = np.fft.rfft(live, 2 * n)
            auto = np.rint(np.fft.irfft(spec * spec.conj(), 2 * n)[:, :n])
            prefix = np.concatenate([np.zeros((b, 1)), live.cumsum(1)], axis=1)
            q = np.arange(n)
            head = prefix[:, n - q]  # sum live[:n-q]
            tail = prefix[:, n : n + 1] - prefix[:, q]  # sum live[q:]
            match = np.rint(head + tail - 2 * auto) == 0
            match[:, 0] = False
            match[:, n // 2 + 1 :] = False
            found = match.any(1) & ~live.astype(bool).all(1)
            period = np.where(found, match.argmax(1), 1)
        out.append(period)
    return np.stack(out, 1)
