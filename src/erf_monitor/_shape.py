"""Shape diagnostics of ERF maps beyond sigma (defined in docs/concepts.md).

Pure functions on one non-negative map (validated like :mod:`erf_monitor._metrics`: float64
CPU, no autograd, plain Python numbers back). Coordinates are pixel indices; in 2-D ``y`` is
the row (downwards) and ``x`` the column (rightwards).

* **Principal axes** (:func:`principal_axes`): the eigen-decomposition of the map's covariance
  matrix (second central moments about the centroid). The widths are the square roots of the
  eigenvalues, largest first; **anisotropy** is the largest over the smallest width (1 for an
  isotropic map, ``inf`` for a line); in 2-D the **angle** of the major axis is measured from
  the ``+x`` axis towards ``+y``, ``theta = 1/2 atan2(2 c_xy, c_xx - c_yy)`` in degrees, in
  ``(-90, 90]`` (0 for an isotropic map).
* **Cross score** (:func:`cross_score`): how much more mass lies on the centre row and column
  (the axis lines through the centre pixel) than the map's own marginals imply.
  With ``C`` the mass fraction on the cross and ``C0`` the same fraction for the product of
  the map's marginal profiles (the separable map with the same marginals),
  ``kappa = (C - C0) / (1 - C0)``: 1 when all mass is on the cross (a "+" pattern, as the
  ERFs of some windowed-attention models), 0 for any separable map (a Gaussian, a box),
  negative when the mass avoids the axes (an "x" or a ring). 0 when ``C0 = 1`` (the marginals
  put all mass on the cross: a single line or point; nothing to compare with).
* **Dead fraction** (:func:`dead_fraction`): the fraction of pixels inside a box (the clipped
  TRF) where the map is exactly zero: no path from that pixel reaches the unit, or in the
  ``replknet``/``openerf`` modes the clamped gradient vanished. Dilated and strided stacks
  without compensating kernels leave periodic zeros ("gridding").
* **Gridding period** (:func:`gridding_period`): per axis, the greatest common divisor of the
  distances between the non-zero entries of the map's marginal profile inside the box
  (1: no period; 2: every other row/column is dead...).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import reduce

import torch

from erf_monitor._metrics import MapLike, _as_float64, _check_centre, mass_extent

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
    """``kappa = (C - C0) / (1 - C0)``: mass on the axis lines through ``centre`` beyond what
    the marginals imply (see the module docs).

    Args:
        heatmap: non-negative ERF map.
        centre: integer pixel per dim (the seed unit's centre pixel).

    Returns:
        A float ``<= 1``; NaN for a zero map; 0.0 when ``C0 = 1``.

    Examples:
        >>> import torch
        >>> plus = torch.zeros(7, 7)
        >>> plus[3, :] = 1.0
        >>> plus[:, 3] = 1.0
        >>> round(cross_score(plus, (3, 3)), 12)
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
    # A pixel is on the cross when at most one of its coordinates differs from the centre's.
    off = torch.zeros(x.shape, dtype=torch.int64)
    marginals = []
    for d in range(nd):
        view = [1] * nd
        view[d] = x.shape[d]
        off = off + (torch.arange(x.shape[d]) != c[d]).view(view).to(torch.int64)
        others = [k for k in range(nd) if k != d]
        marginals.append(p.sum(dim=others) if others else p)
    on = off <= 1
    mass = float(p[on].sum())
    product = reduce(
        torch.mul,
        [m.view([-1 if k == d else 1 for k in range(nd)]) for d, m in enumerate(marginals)],
    )
    expected = float(product.expand(x.shape)[on].sum())
    if 1.0 - expected <= 1e-12:
        return 0.0
    return (mass - expected) / (1.0 - expected)


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
    """Per axis, the gcd of the distances between non-zero entries of the marginal profile
    inside ``box`` (1 when there is no period or fewer than two non-zero entries).

    Examples:
        >>> import torch
        >>> m = torch.zeros(9, 9)
        >>> m[::2, ::3] = 1.0
        >>> gridding_period(m, ((0, 8), (0, 8)))
        (2, 3)
    """
    x = _as_float64(heatmap)
    inside = x[_box_slices(box, tuple(x.shape))]
    out = []
    for d in range(inside.dim()):
        others = [k for k in range(inside.dim()) if k != d]
        profile = inside.sum(dim=others) if others else inside
        nz = torch.nonzero(profile > 0).flatten().tolist()
        steps = [b - a for a, b in itertools.pairwise(nz)]
        out.append(reduce(math.gcd, steps) if steps else 1)
    return tuple(out)


def coverage_within(heatmap: MapLike, t: float, centre: Sequence[int], box: Box) -> float:
    """Fraction of ``box`` (the clipped TRF) inside the centred ``t``-mass square.

    The square is :func:`~erf_monitor._metrics.mass_extent`'s (side ``2 i + 1`` around
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
