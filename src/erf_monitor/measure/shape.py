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

import numpy as np

from erf_monitor.measure import profiles as _prof
from erf_monitor.measure.metrics import MapLike, _as_array, _check_centre, _middle, _one

__all__ = [
    "coverage_within",
    "cross_score",
    "dead_fraction",
    "gridding_period",
    "principal_axes",
]

Box = Sequence[tuple[int, int]]


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
    x = _as_array(heatmap)
    widths, angle = _prof.principal_axes(_one(x, _middle(x)))
    return tuple(float(w) for w in widths[0]), float(angle[0])


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
    x = _as_array(heatmap)
    c = _check_centre(centre, tuple(x.shape))
    if x.ndim == 2:
        return float(_prof.cross_score_2d(_one(x, c))[0])
    return cross_score_nd(x, c)


def cross_score_nd(x: np.ndarray, c: Sequence[int]) -> float:
    """:func:`cross_score` of a validated map of any number of dims, pixel by pixel."""
    total = float(x.sum())
    if total == 0.0:
        return math.nan
    p = x / total
    nd = x.ndim
    beyond = np.zeros(x.shape, dtype=np.int64)
    marginals = []
    for d in range(nd):
        others = tuple(k for k in range(nd) if k != d)
        profile = p.sum(axis=others) if others else p
        # Mass at each distance from the centre, and the median distance h.
        by_dist = _prof.fold(profile[None], c[d])[0]
        h = int(np.flatnonzero(by_dist.cumsum() >= 0.5 - 1e-12)[0])
        view = [1] * nd
        view[d] = x.shape[d]
        dist = np.abs(np.arange(x.shape[d]) - c[d])
        beyond = beyond + (dist > h).reshape(view).astype(np.int64)
        marginals.append(profile.reshape(view))
    off = np.broadcast_to(beyond, x.shape) >= 2
    separable = np.broadcast_to(reduce(np.multiply, marginals), x.shape)
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
    x = _as_array(heatmap)
    inside = x[_box_slices(box, tuple(x.shape))]
    if inside.size == 0:
        return math.nan
    return float(np.count_nonzero(inside == 0)) / inside.size


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
    x = _as_array(heatmap)
    _box_slices(box, tuple(x.shape))  # checks the box's dims
    p = _one(x, _middle(x), box=tuple((int(lo), int(hi)) for lo, hi in box))
    return tuple(int(q) for q in _prof.gridding_period(p)[0])


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
    x = _as_array(heatmap)
    c = _check_centre(centre, tuple(x.shape))
    box = tuple((int(lo), int(hi)) for lo, hi in box)
    return float(_prof.coverage_within(_one(x, c), t, box)[0])
