"""Shape diagnostics of ERF maps beyond sigma (defined in docs/concepts.md).

Pure functions on one non-negative map (validated like :mod:`erf_monitor.measure.metrics`: float64
CPU, no autograd, plain Python numbers back). Coordinates are pixel indices; in 2-D ``y`` is
the row (downwards) and ``x`` the column (rightwards).

* **Principal axes** (:func:`principal_axes`): the eigen-decomposition of the map's covariance
  matrix (second central moments about the centroid). The widths are the square roots of the
  eigenvalues, largest first; **anisotropy** is the largest over the smallest width (1 for an
  isotropic map, ``inf`` for a line); in 2-D the **angle** of the major axis is measured from
  the ``+x`` axis towards ``+y``, ``theta = 1/2 atan2(2 c_xy, c_xx - c_yy)`` in degrees, in
  ``(-90, 90]`` (0 for an isotropic map).
* **Cross score** (:func:`cross_score`): how much less mass lies *off* the centre row and
  column than the map's own marginals imply. The centre row and column are bands as wide as
  the map's median distance from the centre on each axis (``h_k``: half the mass is within
  ``h_k`` of the centre pixel along axis ``k``); the off-axis region ``O`` holds the pixels
  beyond ``h_k`` on at least two axes. With ``E(O)`` the map's mass fraction in ``O`` and
  ``E0(O)`` that of the product of its marginal profiles (the separable map with the same
  marginals), ``kappa = 1 - E(O) / E0(O)``: 1 when no mass is off the axes (a "+" pattern of
  any arm width, as the ERFs of axial or some windowed-attention models), 0 for any separable
  map (a Gaussian, a box), negative when the mass avoids the axes (an "x", a ring). 0 when
  ``E0(O) = 0`` (nothing can be off the axes: a line, a point); NaN for a zero map.
* **Dead fraction** (:func:`dead_fraction`): the fraction of pixels inside a box (the clipped
  TRF) where the map is exactly zero: no path from that pixel reaches the unit, or in the
  ``replknet``/``openerf`` modes the clamped gradient vanished. Dilated and strided stacks
  without compensating kernels leave periodic zeros ("gridding").
* **Gridding period** (:func:`gridding_period`): per axis, the period of the live/dead pattern
  of the map's marginal profile inside the box: the smallest ``p`` (at most half the box) with
  ``live[i] == live[i + p]`` everywhere (1: no dead rows/columns or no period; 2: every other
  row/column is dead; 8: bands of 4 live and 4 dead...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce

import torch

from erf_monitor.measure.metrics import MapLike, _as_float64, _check_centre, mass_extent

__all__ = [
    "coverage_within",
    "cross_score",
    "dead_fraction",
    "gridding_period",
    "principal_axes",
]

Box = Sequence[tuple[int, int]]


def _covariance(x: torch.Tensor) -> torch.Tensor | None:
    """The ``nd x nd`` covariance of a validated map over its pixel indices; ``None`` if zero."""
    total = x.sum()
    if float(total) == 0.0:
        return None
    nd = x.dim()
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in x.shape], indexing="ij")
    p = x / total
    mus = [float((g * p).sum()) for g in grids]
    cov = torch.empty((nd, nd), dtype=torch.float64)
    for a in range(nd):
        for b in range(a, nd):
            c = ((grids[a] - mus[a]) * (grids[b] - mus[b]) * p).sum()
            cov[a, b] = cov[b, a] = c
    return cov


def principal_axes(heatmap: MapLike) -> tuple[tuple[float, ...], float]:
    """Widths along the principal axes (largest first) and, in 2-D, the major axis' angle.

    Args:
        heatmap: non-negative ERF map (1 to 3 dims).

    Returns:
        ``(widths, angle)``: one width per dim (pixels, the standard deviation along each
        principal axis) and the angle in degrees in ``(-90, 90]`` from ``+x`` towards ``+y``
        (NaN unless the map is 2-D). All NaN for a map that is zero everywhere.

    Examples:
        >>> import torch
        >>> m = torch.zeros(9, 9)
        >>> m[4, 0] = m[4, 8] = m[2, 4] = m[6, 4] = 1.0  # +-4 along x, +-2 along y
        >>> principal_axes(m)
        ((2.8284271247461903, 1.4142135623730951), 0.0)
        >>> d = torch.eye(5)  # a line along the main diagonal (down and to the right)
        >>> principal_axes(d)[1]
        45.0
    """
    x = _as_float64(heatmap)
    cov = _covariance(x)
    if cov is None:
        return (math.nan,) * x.dim(), math.nan
    values = torch.linalg.eigvalsh(cov).flip(0)  # descending
    # A degenerate axis (a line) is exactly 0, not rounding noise of order 1e-32.
    values = torch.where(values > 1e-12 * values[0], values, torch.zeros_like(values))
    widths = tuple(math.sqrt(float(v)) for v in values)
    angle = math.nan
    if x.dim() == 2:
        c_yy, c_yx, c_xx = float(cov[0, 0]), float(cov[0, 1]), float(cov[1, 1])
        angle = 0.5 * math.degrees(math.atan2(2 * c_yx, c_xx - c_yy))
        if angle <= -90.0:  # atan2 of (-0.0, negative) is -180: the same axis as +90
            angle += 180.0
    return widths, angle


def anisotropy(widths: Sequence[float]) -> float:
    """Largest over smallest principal width: 1 isotropic, ``inf`` for a line, NaN if zero."""
    if not widths or any(math.isnan(w) for w in widths):
        return math.nan
    big, small = max(widths), min(widths)
    if small == 0.0:
        return math.inf if big > 0.0 else math.nan
    return big / small


def cross_score(heatmap: MapLike, centre: Sequence[int]) -> float:
    """``kappa = 1 - E(O) / E0(O)``: how much less mass lies off the axes through ``centre``
    than the map's marginals imply (see the module docs).

    ``d_k = |x_k - centre_k|`` per axis; ``h_k`` is the median of ``d_k`` under the map (the
    smallest ``h`` with at least half the mass at ``d_k <= h``); the off-axis region ``O``
    holds the pixels beyond ``h_k`` on at least two axes. ``E(O)`` is the map's mass fraction
    in ``O``, ``E0(O)`` the same for the product of its marginal profiles.

    Args:
        heatmap: non-negative ERF map (2 or 3 dims; 1-D maps have no off-axis region).
        centre: integer pixel per dim (the seed unit's centre pixel).

    Returns:
        A float ``<= 1``; 0.0 when ``E0(O) = 0`` (nothing can be off the axes: a line, a
        point, a map narrower than its median band); NaN for a zero map.

    Examples:
        >>> import torch
        >>> plus = torch.zeros(7, 7)
        >>> plus[3, :] = 1.0
        >>> plus[:, 3] = 1.0
        >>> cross_score(plus, (3, 3))
        1.0
        >>> box = torch.zeros(7, 7)
        >>> box[1:6, 1:6] = 1.0
        >>> abs(cross_score(box, (3, 3))) < 1e-12
        True
    """
    x = _as_float64(heatmap)
    c = _check_centre(centre, tuple(x.shape))
    total = float(x.sum())
    if total == 0.0:
        return math.nan
    p = x / total
    nd = x.dim()
    beyond = torch.zeros(x.shape, dtype=torch.int64)
    marginals = []
    for d in range(nd):
        others = [k for k in range(nd) if k != d]
        profile = p.sum(dim=others) if others else p
        dist = (torch.arange(x.shape[d]) - c[d]).abs()
        # Mass at each distance from the centre, and the median distance h.
        by_dist = torch.zeros(int(dist.max()) + 1, dtype=torch.float64).index_add_(0, dist, profile)
        h = int(torch.nonzero(by_dist.cumsum(0) >= 0.5 - 1e-12)[0, 0])
        view = [1] * nd
        view[d] = x.shape[d]
        beyond = beyond + (dist > h).view(view).to(torch.int64)
        marginals.append(profile.view(view))
    off = beyond.expand(x.shape) >= 2
    separable = reduce(torch.mul, marginals).expand(x.shape)
    expected = float(separable[off].sum())
    if expected <= 1e-12:
        return 0.0
    return 1.0 - float(p[off].sum()) / expected


def _box_slices(box: Box, shape: tuple[int, ...]) -> tuple[slice, ...]:
    if len(box) != len(shape):
        raise ValueError(f"box {tuple(box)} has {len(box)} dims but the map has {len(shape)}")
    return tuple(slice(max(int(lo), 0), min(int(hi), s - 1) + 1) for (lo, hi), s in zip(box, shape))


def dead_fraction(heatmap: MapLike, box: Box) -> float:
    """Fraction of the pixels inside ``box`` (inclusive ``(start, end)`` per dim, clipped to
    the map) where the map is exactly zero.

    Examples:
        >>> import torch
        >>> m = torch.zeros(5, 5)
        >>> m[::2, ::2] = 1.0  # a dilation-2 pattern: 9 live pixels of 25
        >>> dead_fraction(m, ((0, 4), (0, 4)))
        0.64
    """
    x = _as_float64(heatmap)
    inside = x[_box_slices(box, tuple(x.shape))]
    if inside.numel() == 0:
        return math.nan
    return float((inside == 0).sum()) / inside.numel()


def gridding_period(heatmap: MapLike, box: Box) -> tuple[int, ...]:
    """Per axis, the period of the live/dead pattern of the map's marginal profile inside
    ``box``: the smallest ``p <= n / 2`` with ``live[i] == live[i + p]`` for every ``i`` (``n``
    entries; ``live`` = the profile is non-zero there); 1 when every entry is live or no such
    period exists.

    Examples:
        >>> import torch
        >>> m = torch.zeros(9, 9)
        >>> m[::2, ::3] = 1.0  # every other row, every third column
        >>> gridding_period(m, ((0, 8), (0, 8)))
        (2, 3)
        >>> bands = torch.zeros(4, 16)
        >>> bands[:, [0, 1, 2, 3, 8, 9, 10, 11]] = 1.0  # 4 live, 4 dead, ...
        >>> gridding_period(bands, ((0, 3), (0, 15)))
        (1, 8)
    """
    x = _as_float64(heatmap)
    inside = x[_box_slices(box, tuple(x.shape))]
    out = []
    for d in range(inside.dim()):
        others = [k for k in range(inside.dim()) if k != d]
        live = ((inside.sum(dim=others) if others else inside) > 0).tolist()
        n = len(live)
        period = 1
        if not all(live):
            for q in range(1, n // 2 + 1):
                if all(live[i] == live[i + q] for i in range(n - q)):
                    period = q
                    break
        out.append(period)
    return tuple(out)


def coverage_within(heatmap: MapLike, t: float, centre: Sequence[int], box: Box) -> float:
    """Fraction of ``box`` (the clipped TRF) inside the centred ``t``-mass square.

    The square is :func:`~erf_monitor.measure.metrics.mass_extent`'s (side ``2 i + 1`` around
    ``centre``); its overlap with the box, over the box's pixel count. 1.0 when the square
    covers the whole field the unit can see; comparable between border and centre units,
    whose fields the image clips differently.

    Examples:
        >>> import torch
        >>> m = torch.zeros(10, 10)
        >>> m[0:3, 0:3] = 1.0
        >>> coverage_within(m, 0.9, (1, 1), ((0, 5), (0, 5)))  # the 3 x 3 square of 6 x 6
        0.25
    """
    x = _as_float64(heatmap)
    c = _check_centre(centre, tuple(x.shape))
    side = mass_extent(x, t, c)
    if side == 0:
        return 0.0
    r = (side - 1) // 2
    overlap, size = 1, 1
    for cd, (lo, hi), s in zip(c, box, x.shape):
        lo, hi = max(int(lo), 0), min(int(hi), s - 1)
        size *= max(hi - lo + 1, 0)
        overlap *= max(min(cd + r, hi) - max(cd - r, lo) + 1, 0)
    return overlap / size if size else math.nan
