"""Regions: the index sets that the receptive-field walk carries backward, one per tensor.

A :class:`Region` holds, per tensor axis, an :class:`Axis`: an unclipped inclusive interval
``[lo, hi]`` (indices as if every plane were infinite: padding never clips it), the exact set
of in-bounds indices that can influence the seed (a boolean mask), a ``mixed`` flag (a global
op needs the whole axis), the effective stride ("jump") accumulated along the path and a
``wrap`` flag (a circular op folded part of the interval onto the far side).

Most ops keep the set a product of its per-axis masks. Window partitions and masked attention
do not: after a Swin window partition the window index and the position inside the window are
tied (a box of pixels is not a box of windows times a box of positions), and a shifted-window
mask lets each window's queries read a different part of the window. There the region also
holds a :class:`Joint`: the exact set over the tied axes as one boolean array. The per-axis
masks are always the projections of the set, so a receptive field read off them is exact.
An op whose rule does not know joints gets the product of the masks instead (a superset).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from erf_monitor.trf.tracer import Unsupported

__all__ = [
    "Axis",
    "Joint",
    "Region",
    "broadcast_region",
    "carry_joint",
    "dense",
    "full_axis",
    "joined",
    "point_axis",
    "reshape_region",
    "roll_taps",
    "table_axis",
    "transposed_axis",
    "window_axis",
    "window_taps",
]

Mask = npt.NDArray[np.bool_]
#: ``taps[o]``: the input indices that output index ``o`` reads along one axis (-1: none).
Taps = npt.NDArray[np.int64]
#: ``{input axis: (output axis, taps or None for index to index, input size)}``.
AxisMap = dict[int, tuple[int, "Taps | None", int]]
#: Largest joint mask a union builds (elements); beyond it the union keeps the product.
_UNION_BUDGET = 1 << 22


@dataclass
class Axis:
    """Region of one tensor axis (see the module docstring)."""

    lo: int | None  # unclipped interval; None when ``mixed``
    hi: int | None
    mask: Mask  # in-bounds indices that can influence the seed
    mixed: bool = False  # a global op needs this whole axis
    jump: Fraction | None = Fraction(1)  # input pixels per unit along this axis (None: no map)
    wrap: bool = False  # circular padding folded part of the interval onto the far side

    def union(self, other: Axis) -> Axis:
        mixed = self.mixed or other.mixed
        jumps = [j for j in (self.jump, other.jump) if j is not None]
        lo = hi = None
        if not mixed:
            # A wrapped interval is cyclic: the other one is taken whole turns away where that
            # joins them more tightly ([-2, 0] and [11, 11] on 12 indices: [-2, 0]).
            turns = (-1, 0, 1) if self.wrap or other.wrap else (0,)
            n = self.mask.size
            lo, hi = min(
                (
                    (min(_int(self.lo), _int(other.lo) + t * n),
                     max(_int(self.hi), _int(other.hi) + t * n))
                    for t in turns
                ),
                key=lambda span: (span[1] - span[0], span[0] < 0),
            )  # fmt: skip
        return Axis(
            lo, hi, self.mask | other.mask, mixed, max(jumps) if jumps else None,
            self.wrap or other.wrap,
        )  # fmt: skip


@dataclass
class Joint:
    """The exact set over tied axes ``dims`` (ascending) of a region, as one boolean array."""

    dims: tuple[int, ...]
    mask: Mask  # shape: the sizes of ``dims``


@dataclass
class Region:
    """Per-axis region of one tensor, plus whether every op so far was local.

    ``data_dependent`` (set on the input's region by the walk) names an op on the way
    that samples the input at positions computed from the input; ``masked`` (likewise) says
    that attention weights a constant mask switched off were left out on the way
    (:mod:`erf_monitor.trf.masks`). ``joint``: see the module docstring.
    """

    axes: list[Axis]
    local: bool = True
    data_dependent: str = ""
    masked: bool = False
    joint: Joint | None = None

    def union(self, other: Region) -> Region:
        if len(self.axes) != len(other.axes):
            raise Unsupported("regions of different rank met at one tensor")
        axes = [a.union(b) for a, b in zip(self.axes, other.axes)]
        local = self.local and other.local
        # Axes where both sets have the same mask (outside joints) factor out of the union.
        tied = {d for r in (self, other) if r.joint is not None for d in r.joint.dims}
        tied |= {
            d
            for d, (a, b) in enumerate(zip(self.axes, other.axes))
            if not np.array_equal(a.mask, b.mask)
        }
        dims = sorted(tied)
        if len(dims) < 2 or math.prod(axes[d].mask.size for d in dims) > _UNION_BUDGET:
            return Region(axes, local)
        return joined(axes, dims, dense(self, dims) | dense(other, dims), local)


def _int(v: int | None) -> int:
    if v is None:
        raise Unsupported("internal: unbounded interval on a non-mixed axis")
    return v


def full_axis(n: int, *, mixed: bool = True, jump: Fraction | None = None) -> Axis:
    """An axis needed entirely (``mixed``: because a global op reads all of it)."""
    if mixed:
        return Axis(None, None, np.ones(n, dtype=bool), True, jump)
    return Axis(0, n - 1, np.ones(n, dtype=bool), False, jump)


def point_axis(n: int, i: int) -> Axis:
    """Axis of size ``n`` where only index ``i`` is needed."""
    mask = np.zeros(n, dtype=bool)
    mask[i] = True
    return Axis(i, i, mask, False, Fraction(1))


def finite_axis(mask: Mask, *, mixed: bool = False, wrap: bool = False) -> Axis:
    """An axis whose interval is the hull of ``mask`` (no map to the input: jump unknown);
    the cyclic hull (:func:`cyclic_hull`) where the field came wrapped."""
    if mixed and mask.all():
        return Axis(None, None, mask, True, None)
    if wrap:
        lo, hi, crosses = cyclic_hull(mask)
        return Axis(lo, hi, mask, False, None, crosses)
    nz = np.flatnonzero(mask)
    lo, hi = (int(nz[0]), int(nz[-1])) if nz.size else (0, -1)
    return Axis(lo, hi, mask, False, None)


def cyclic_hull(mask: Mask) -> tuple[int, int, bool]:
    """The shortest cyclic interval holding ``mask``'s set, written unwrapped: ``(lo, hi,
    crosses)`` with ``lo < 0`` when it runs over the end of the axis and on from its start."""
    n = mask.size
    nz = np.flatnonzero(mask)
    if nz.size == 0:
        return 0, -1, False
    gaps = np.diff(np.concatenate([nz, [nz[0] + n]]))  # gap after each set index, cyclically
    k = int(np.argmax(gaps))
    if k == nz.size - 1:  # the largest gap wraps around the end: no crossing
        return int(nz[0]), int(nz[-1]), False
    return int(nz[k + 1]) - n, int(nz[k]), True  # from nz[k + 1], over the end, to nz[k]


# ----------------------------------------------------------------------------- joints


def dense(reg: Region, dims: Sequence[int]) -> Mask:
    """The region's set projected onto ``dims`` (ascending), as one boolean array."""
    dims = tuple(dims)
    out = np.ones([reg.axes[d].mask.size for d in dims], dtype=bool)
    covered: set[int] = set()
    j = reg.joint
    if j is not None:
        keep = [k for k, d in enumerate(j.dims) if d in dims]
        drop = tuple(k for k in range(len(j.dims)) if k not in keep)
        part = _any(j.mask, drop)
        shape = [1] * len(dims)
        for k in keep:
            shape[dims.index(j.dims[k])] = j.mask.shape[k]
        out &= part.reshape(shape)
        covered = {j.dims[k] for k in keep}
    for p, d in enumerate(dims):
        if d not in covered:
            shape = [1] * len(dims)
            shape[p] = out.shape[p]
            out &= reg.axes[d].mask.reshape(shape)
    if any(not reg.axes[d].mask.any() for d in range(len(reg.axes)) if d not in dims):
        out[...] = False  # an empty axis elsewhere empties the set
    return out


def joined(axes: Sequence[Axis], dims: Sequence[int], mask: Mask, local: bool) -> Region:
    """A region whose set over ``dims`` (ascending) is ``mask``; the masks of those axes
    become its projections, and the joint is dropped when the set is their product."""
    new = list(axes)
    projections = []
    for p, d in enumerate(dims):
        other = tuple(q for q in range(len(dims)) if q != p)
        proj = _any(mask, other)
        projections.append(proj)
        new[d] = replace(new[d], mask=proj)
    return Region(new, local, joint=_joint_or_none(tuple(dims), mask, projections))


def _joint_or_none(dims: tuple[int, ...], mask: Mask, projections: list[Mask]) -> Joint | None:
    if len(dims) < 2:
        return None
    product = np.ones(mask.shape, dtype=bool)
    for p, proj in enumerate(projections):
        shape = [1] * len(dims)
        shape[p] = proj.size
        product &= proj.reshape(shape)
    return None if np.array_equal(product, mask) else Joint(dims, mask)


def with_joint(axes: Sequence[Axis], carried: tuple[list[int], Mask] | None, local: bool) -> Region:
    """A region with the joint :func:`carry_joint` returned (None: the product of the masks)."""
    if carried is None:
        return Region(list(axes), local)
    return joined(axes, carried[0], carried[1], local)


def carry_joint(
    reg: Region, mapping: Mapping[int, tuple[int, Taps | None, int]]
) -> tuple[list[int], Mask] | None:
    """The joint of an op's input from its output's joint, for ops that act axis by axis.

    ``mapping[in_dim] = (out_dim, taps, n_in)``: input axis ``in_dim`` is output axis
    ``out_dim`` read through ``taps`` (None: index for index) and has size ``n_in``. Output
    axes that no input axis maps are read entirely or not at all along the way (a mixed
    channel axis, a broadcast operand): they are projected out. Returns ``(in dims, mask)``
    or None when no two tied axes remain.
    """
    j = reg.joint
    if j is None:
        return None
    pairs = sorted((o, i, t, n) for i, (o, t, n) in mapping.items() if o in j.dims)
    if len(pairs) < 2:
        return None
    keep = [o for o, *_ in pairs]
    drop = tuple(k for k, d in enumerate(j.dims) if d not in keep)
    mask = _any(j.mask, drop)
    for p, (_o, _i, taps, n) in enumerate(pairs):
        if taps is not None:
            mask = remap(mask, p, taps, n)
    order = np.argsort([i for _o, i, *_ in pairs], kind="stable")
    return [pairs[k][1] for k in order], np.transpose(mask, order)


def _any(mask: Mask, axes: tuple[int, ...]) -> Mask:
    """``mask`` projected along ``axes`` (a copy, always an array)."""
    return np.asarray(mask.any(axis=axes) if axes else mask.copy(), dtype=bool)


def remap(mask: Mask, pos: int, taps: Taps, n_in: int) -> Mask:
    """Move a set along axis ``pos`` through ``taps`` (output index -> input indices read)."""
    moved = np.moveaxis(mask, pos, 0)
    out = np.zeros((n_in, *moved.shape[1:]), dtype=bool)
    for t in range(taps.shape[1]):
        idx = taps[:, t]
        ok = idx >= 0
        np.logical_or.at(out, idx[ok], moved[ok])
    return np.moveaxis(out, 0, pos)


def identity_map(dims: Iterable[int], shape: Sequence[int]) -> AxisMap:
    """``carry_joint`` mapping of axes kept as they are (input dim = output dim)."""
    return {d: (d, None, shape[d]) for d in dims}


# ----------------------------------------------------------------------------- geometry


def _mask_from(vals: npt.NDArray[np.int64], n: int) -> Mask:
    mask = np.zeros(n, dtype=bool)
    mask[vals] = True
    return mask


def _fold(vals: npt.NDArray[np.int64], n: int, mode: str) -> npt.NDArray[np.int64]:
    """Map (possibly out-of-range) indices of a padded plane onto the real indices they read
    (-1 where they read padding)."""
    if mode in ("zeros", "constant"):
        return np.where((vals >= 0) & (vals < n), vals, -1)
    if mode == "replicate":
        return np.clip(vals, 0, n - 1)
    if mode == "circular":
        return np.mod(vals, n)
    if mode == "reflect":
        if n == 1:
            return np.zeros_like(vals)
        period = 2 * (n - 1)
        v = np.mod(np.abs(vals), period)
        return np.where(v >= n, period - v, v)
    raise Unsupported(f"padding mode {mode!r}")


def _times(j: Fraction | None, s: Fraction | int) -> Fraction | None:
    return None if j is None else j * s


def window_taps(n_out: int, n_in: int, k: int, s: int, p: int, d: int, mode: str) -> Taps:
    """Conv/pool taps: output ``o`` reads inputs ``o*s - p + d*t`` for ``t < k`` (folded)."""
    o = np.arange(n_out, dtype=np.int64)[:, None]
    return _fold(o * s - p + d * np.arange(k, dtype=np.int64)[None, :], n_in, mode)


def window_axis(ax: Axis, n_in: int, k: int, s: int, p: int, d: int, mode: str = "zeros") -> Axis:
    """Conv/pool geometry: output ``o`` reads inputs ``o*s - p + d*t`` for ``t < k``."""
    idx = np.flatnonzero(ax.mask).astype(np.int64)
    vals = (idx[:, None] * s - p + d * np.arange(k, dtype=np.int64)[None, :]).ravel()
    folded = _fold(vals, n_in, mode)
    mask = _mask_from(folded[folded >= 0], n_in)
    if ax.mixed:
        return Axis(None, None, mask, True, _times(ax.jump, s))
    lo, hi = _int(ax.lo) * s - p, _int(ax.hi) * s - p + d * (k - 1)
    wrap = ax.wrap or (mode == "circular" and bool(((vals < 0) | (vals >= n_in)).any()))
    return Axis(lo, hi, mask, False, _times(ax.jump, s), wrap)


def roll_taps(n: int, shift: int) -> Taps:
    """``torch.roll`` along one axis: output ``o`` reads input ``(o - shift) mod n``."""
    return np.mod(np.arange(n, dtype=np.int64) - shift, n)[:, None]


def roll_axis(ax: Axis, shift: int) -> Axis:
    """``torch.roll`` along one axis: a cyclic shift of the set (exact mask).

    A roll has no infinite plane: the interval becomes the :func:`cyclic_hull` of the
    shifted in-bounds set (flagged ``wrap`` when it runs over the end of the axis and on from
    its start). The roll back of a Swin block thus gives the interval the block started
    from, and a field that a roll really splits across the border is reported as wrapping.
    Padding that the interval reached beyond the border (read as zeros) has nothing to roll:
    it is dropped.
    """
    mask = np.roll(ax.mask, -shift)
    if ax.mixed:
        return Axis(None, None, mask, True, ax.jump)
    lo, hi, crosses = cyclic_hull(mask)
    return Axis(lo, hi, mask, False, ax.jump, crosses)


def transposed_axis(ax: Axis, n_in: int, k: int, s: int, p: int, d: int) -> tuple[Axis, bool]:
    """Transposed-conv geometry: output ``o`` receives input ``i`` iff ``o = i*s - p + d*t``.

    Returns the axis and whether the unclipped set is non-empty.
    """
    taps = d * np.arange(k, dtype=np.int64)

    def sources(outs: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        num = (outs[:, None] + p - taps[None, :]).ravel()
        return num[np.mod(num, s) == 0] // s

    idx = np.flatnonzero(ax.mask).astype(np.int64)
    src = sources(idx)
    mask = _mask_from(src[(src >= 0) & (src < n_in)], n_in)
    jump = None if ax.jump is None else ax.jump / s
    if ax.mixed:
        return Axis(None, None, mask, True, jump), True
    lo, hi = _int(ax.lo), _int(ax.hi)
    unclipped = sources(np.arange(lo, hi + 1, dtype=np.int64))
    if unclipped.size == 0:
        return Axis(0, -1, mask, False, jump, ax.wrap), False
    return Axis(int(unclipped.min()), int(unclipped.max()), mask, False, jump, ax.wrap), True


def table_axis(
    ax: Axis, n_in: int, taps: Callable[[int], tuple[int, int]], jump: Fraction | None
) -> Axis:
    """Geometry given by a monotone per-output window ``taps(o) -> (first, last)`` (unclamped)."""
    mask = np.zeros(n_in, dtype=bool)
    for o in np.flatnonzero(ax.mask):
        a, b = taps(int(o))
        a, b = max(a, 0), min(b, n_in - 1)
        if a <= b:
            mask[a : b + 1] = True
    new_jump = None if ax.jump is None or jump is None else ax.jump * jump
    if ax.mixed:
        return Axis(None, None, mask, True, new_jump)
    return Axis(taps(_int(ax.lo))[0], taps(_int(ax.hi))[1], mask, False, new_jump, ax.wrap)


# ----------------------------------------------------------------------------- shapes


def broadcast_region(reg: Region, out_shape: Sequence[int], in_shape: Sequence[int]) -> Region:
    """Region of an operand broadcast (right-aligned) to ``out_shape``."""
    off = len(out_shape) - len(in_shape)
    if off < 0:
        raise Unsupported("operand has more dims than the result")
    axes: list[Axis] = []
    kept: AxisMap = {}
    for k, n in enumerate(in_shape):
        a = reg.axes[k + off]
        if n == 1 and out_shape[k + off] != 1:
            axes.append(Axis(0, 0, np.ones(1, dtype=bool), a.mixed, a.jump, a.wrap))
            if a.mixed:
                axes[-1].lo = axes[-1].hi = None
        else:
            axes.append(replace(a))
            kept[k] = (k + off, None, n)
    return with_joint(axes, carry_joint(reg, kept), reg.local)


def _reshape_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Split two shapes of equal numel into groups of axes with equal products."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        gi: list[int] = []
        gj: list[int] = []
        pa = pb = 1
        if i < len(a):
            gi.append(i)
            pa *= a[i]
            i += 1
        if j < len(b):
            gj.append(j)
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i)
                pa *= a[i]
                i += 1
            elif j < len(b):
                gj.append(j)
                pb *= b[j]
                j += 1
            else:
                raise Unsupported("reshape between shapes of different sizes")
        groups.append((gi, gj))
    return groups


def reshape_region(reg: Region, in_shape: Sequence[int], out_shape: Sequence[int]) -> Region:
    """Region of the input of a reshape (view/flatten/squeeze/...) from its output's.

    Axes that map one to one keep their region. Axes split or merged (a window partition)
    take the exact set: the output's set over those axes (and any tied to them) reshaped
    to the input's axes, as a joint.
    """
    axes: list[Axis] = [full_axis(1)] * len(in_shape)
    local = reg.local
    tied = set(reg.joint.dims) if reg.joint is not None else set()
    dims_out: list[int] = []  # output axes of the exact set, ascending ...
    dims_in: list[int] = []  # ... and the input axes they reshape into
    merged: list[tuple[list[int], list[int]]] = []
    for gi, gj in _reshape_groups(in_shape, out_shape):
        big_i = [k for k in gi if in_shape[k] > 1]
        big_j = [k for k in gj if out_shape[k] > 1]
        if len(gi) == 1 and len(gj) == 1:
            axes[gi[0]] = replace(reg.axes[gj[0]])
            if gj[0] in tied:
                dims_out.append(gj[0])
                dims_in.append(gi[0])
            continue
        if len(big_i) <= 1 and len(big_j) <= 1 and len(big_i) == len(big_j):
            # only size-1 axes added/removed: the big axis maps one to one
            for k in gi:
                if big_i and k == big_i[0]:
                    axes[k] = replace(reg.axes[big_j[0]])
                    continue
                axes[k] = point_axis(1, 0)
                if not big_i:
                    axes[k].mixed = any(reg.axes[m].mixed for m in gj)
                    if axes[k].mixed:
                        axes[k].lo = axes[k].hi = None
            if big_i and big_j[0] in tied:
                dims_out.append(big_j[0])
                dims_in.append(big_i[0])
            continue
        local = False
        if not tied.intersection(gj) and all(reg.axes[k].mask.all() for k in gj):
            mixed = any(reg.axes[k].mixed for k in gj)
            for k in gi:
                axes[k] = finite_axis(np.ones(in_shape[k], dtype=bool), mixed=mixed)
            continue
        merged.append((gi, gj))
        dims_out += gj
        dims_in += gi
    if not dims_out:
        return Region(axes, local)
    order_out = sorted(dims_out)
    order_in = sorted(dims_in)
    exact = dense(reg, order_out).reshape([in_shape[k] for k in order_in])
    new = joined(axes, order_in, exact, local)
    for gi, gj in merged:
        # A mixed axis that lands on part of an input axis (a Swin window merged back into
        # its image axis) is a finite, in-bounds window there: not global.
        mixed = any(reg.axes[k].mixed for k in gj)
        wrap = any(reg.axes[k].wrap for k in gj)
        for k in gi:
            new.axes[k] = finite_axis(new.axes[k].mask, mixed=mixed, wrap=wrap)
    return new
