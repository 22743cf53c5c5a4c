"""Cropping: which seed units run on which window of the input, chosen by cost.

Nothing outside a layer's clipped TRF can reach its seed unit, so when every operation on
the way is local and shift-equivariant with integer strides (``TRF.local``) the unit
computed on a crop of the input that contains the clipped TRF, starts at a multiple of the
layer's effective stride and keeps the zero padding of the real borders, is *exactly* the
unit of the full computation (it sits at ``index - start // stride`` of the cropped output).
In a model that pads from the size of its input (TensorFlow's "SAME", timm's ``Conv2dSame``:
the left padding depends on the size's parity), a window that stops before the input's end
also has the input's size modulo the stride, so that the crop is padded as the input is,
layer by layer (``sized_padding``).
Layers are grouped by window (a layer joins a larger window when that is cheaper than a
forward of its own); a layer's seed units run on one window around all of them, each on its
own, or in clusters that share a forward on the window around them, whichever :func:`_cost`
says is cheaper, and a layer's own windows are dropped for a group of other layers whose
forward runs anyway when their extra backwards there cost less. Windows keep a one-pixel
margin outside the TRF: a non-zero gradient there would mean the TRF was wrong, and the layer
is then probed on the full input. Units whose TRF is global, not local or unknown, and every
unit in ``train_mode`` (BatchNorm statistics would see the crop), run on the full input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from erf_monitor.probe import seeds
from erf_monitor.trf.types import TRF

__all__ = [
    "CropOption",
    "Group",
    "Index",
    "Window",
    "crop_index",
    "integer_strides",
    "margin_clear",
    "plan_groups",
    "unit_boxes",
    "without_cropping",
]


#: A layer is cropped only if its window is at most this fraction of the input (area).
_CROP_MAX_FRACTION = 0.9


#: A layer joins a larger group's window (no forward of its own) when its own window would be
#: at least this fraction of that window: a separate group costs ``F (1 + B) a`` against the
#: extra backward ``F B (b - a)`` (forward cost ``F`` per pixel to the layer, backward ``B F``
#: with ``B`` about 1), so sharing pays from ``a / b`` about 1/2 on.
_CROP_MERGE_FRACTION = 0.5


def _merge_fraction(backwards: int) -> float:
    """:data:`_CROP_MERGE_FRACTION` for units that need ``backwards`` backward passes: each
    of them runs on the larger window once joined (``n B b`` against ``F (1 + n B) a``), so
    joining pays only from ``a / b`` about ``n / (n + 1)`` on (``1/2`` for one)."""
    return 1 - (1 - _CROP_MERGE_FRACTION) / max(backwards, 1)


#: Pixels kept outside the TRF on every cropped side; the gradient there must be exactly zero.
_CROP_MARGIN = 1


CropOption = bool | Literal["auto"]


@dataclass(frozen=True)
class Window:
    """A box of the input, ``start`` inclusive and ``stop`` exclusive per spatial dim."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def area(self) -> int:
        return math.prod(self.shape)

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def overlaps(self, other: Window) -> bool:
        return all(
            a < d and c < b for a, b, c, d in zip(self.start, self.stop, other.start, other.stop)
        )

    def contains(self, other: Window) -> bool:
        return all(
            a <= c and d <= b for a, b, c, d in zip(self.start, self.stop, other.start, other.stop)
        )


Index = tuple[int, ...]


@dataclass
class Group:
    """Seed units probed from one forward on one input window (``None``: the full input).

    ``units[layer]`` lists the output indices (on the full output grid) probed for the layer.
    ``pack``: units with disjoint TRFs may share a backward (:mod:`erf_monitor.probe.seeds`).
    """

    window: Window | None
    layers: list[str]
    units: dict[str, list[Index]] = field(default_factory=dict)
    pack: bool = True

    def add(self, name: str, indices: Sequence[Index]) -> None:
        if name not in self.layers:
            self.layers.append(name)
        if indices:
            have = self.units.setdefault(name, [])
            have += [i for i in indices if i not in have]


def integer_strides(trf: TRF) -> tuple[int, ...] | None:
    strides = []
    for s in trf.stride:
        if not (math.isfinite(s) and s >= 1 and float(s).is_integer()):
            return None
        strides.append(int(s))
    return tuple(strides)


def crop_window(
    trf: TRF | None, spatial: tuple[int, ...], sized_padding: bool = False
) -> Window | None:
    """The stride-aligned window (with margin) that reproduces the layer's centre unit exactly
    (``sized_padding``: its size is the input's modulo the stride; see the module docstring).

    ``None`` when the layer must run on the full input: no TRF, not local, global, a TRF for
    another input shape, non-integer strides, or a window as large as the input.
    """
    if trf is None or not trf.local or trf.is_global or trf.method != "fx":
        return None
    if tuple(trf.input_shape) != spatial or len(trf.clipped) != len(spatial):
        return None
    if len(trf.output_centre) != len(spatial):
        return None
    strides = integer_strides(trf)
    if strides is None:
        return None
    start, stop = [], []
    for (lo, hi), (u_lo, u_hi), s, size in zip(trf.clipped, trf.interval, strides, spatial):
        # A field reaching beyond a border reads that border's padding (its in-bounds hull can
        # end earlier, between dilated taps): the window keeps the border, so that padding,
        # and the output grid that depends on it, stay as they are.
        a = 0 if u_lo < 0 else max(int(lo) - _CROP_MARGIN, 0)
        start.append(a - a % s)
        b = size if u_hi > size - 1 else min(int(hi) + 1 + _CROP_MARGIN, size)
        stop.append(b + (size - b) % s if sized_padding else b)
    window = Window(tuple(start), tuple(stop))
    if window.shape == spatial:
        return None
    return window


def _aligned(window: Window | None, trf: TRF | None, sized_padding: bool = False) -> bool:
    if window is None:
        return True
    strides = None if trf is None else integer_strides(trf)
    if strides is None or trf is None:
        return False
    return all(
        a % s == 0 and (not sized_padding or (n - b) % s == 0)
        for a, b, s, n in zip(window.start, window.stop, strides, trf.input_shape)
    )


#: The planner's cost of a forward on a window of ``A`` pixels is ``A ** _PIXEL_EXPONENT`` plus
#: ``_FORWARD_OVERHEAD`` (in the same units), a backward ``_BACKWARD_COST`` times that without
#: the overhead. Fitted on CPU (resnet50, 5 x 5 grids at 224 to 640 px; docs/benchmarks.md):
#: a pixel of a large tensor costs more than one of a small crop (caches), and every extra
#: forward costs Python and hook time. Only speed depends on these, never a number.
_BACKWARD_COST = 1.0

_PIXEL_EXPONENT = 1.2

_FORWARD_OVERHEAD = 4e4


def _cost(area: int, backwards: int) -> float:
    return float(area) ** _PIXEL_EXPONENT * (1 + _BACKWARD_COST * backwards) + _FORWARD_OVERHEAD


def _box(trf: TRF | None) -> seeds.Box | None:
    """The clipped TRF box of a unit, when it may be packed: an exact (fx), finite field
    through local operations (what cropping trusts too)."""
    if trf is None or trf.method != "fx" or not trf.local or trf.is_global or trf.data_dependent:
        return None
    return tuple((int(lo), int(hi)) for lo, hi in trf.clipped)


def unit_boxes(units: Mapping[Index, TRF | None]) -> dict[Index, seeds.Box] | None:
    """Every unit's box, or ``None`` when one of them cannot be packed."""
    out = {}
    for idx, trf in units.items():
        box = _box(trf)
        if box is None:
            return None
        out[idx] = box
    return out


def _union(windows: Sequence[Window], spatial: tuple[int, ...]) -> Window | None:
    """The smallest window holding every one (stride-aligned if they are); ``None``: the input."""
    start = tuple(min(w.start[d] for w in windows) for d in range(len(spatial)))
    stop = tuple(max(w.stop[d] for w in windows) for d in range(len(spatial)))
    return None if stop == spatial and not any(start) else Window(start, stop)


def _layer_items(
    units: Mapping[Index, TRF], spatial: tuple[int, ...], crop: CropOption, sized: bool = False
) -> list[tuple[Window | None, list[Index]]]:
    """How one layer's seed units are cropped: ``[(window, units)]``.

    ``crop=True``: each unit on its own window. ``"auto"``: one window around all of them
    (one forward, packed backwards) or one per unit, whichever :func:`_cost` says is
    cheaper.
    """
    total = math.prod(spatial)
    windows: dict[Index, Window | None] = {}
    for idx, trf in units.items():
        w = crop_window(trf, spatial, sized)
        if w is not None and crop == "auto" and w.area > _CROP_MAX_FRACTION * total:
            w = None
        windows[idx] = w
    full = [i for i, w in windows.items() if w is None]
    own = [(w, [i]) for i, w in windows.items() if w is not None]
    split: list[tuple[Window | None, list[Index]]] = [*own, *([(None, full)] if full else [])]
    if crop is True or len(units) == 1:
        return split
    boxes = unit_boxes(units)

    def backwards(idxs: list[Index]) -> int:
        return len(seeds.pack_units(idxs, boxes))

    shared_window = None if full else _union([w for w, _ in own], spatial)
    shared = _cost(total if shared_window is None else shared_window.area, backwards(list(units)))
    separate = sum(_cost(w.area, 1) for w, _ in own)
    if full:
        separate += _cost(total, backwards(full))
    if len(units) <= _CLUSTER_MAX_UNITS:
        clusters = _clusters(split, backwards, spatial)
        if _items_cost(clusters, backwards, total) < min(shared, separate):
            return clusters
    return [(shared_window, list(units))] if shared <= separate else split


#: Units of one layer clustered greedily (:func:`_clusters`) up to this many (O(n^3) steps).
_CLUSTER_MAX_UNITS = 50

Items = list[tuple[Window | None, list[Index]]]


def _items_cost(items: Items, backwards: Callable[[list[Index]], int], total: int) -> float:
    return sum(_cost(total if w is None else w.area, backwards(idxs)) for w, idxs in items)


def _clusters(
    items: Items, backwards: Callable[[list[Index]], int], spatial: tuple[int, ...]
) -> Items:
    """Units sharing forwards on the windows around them: starting from ``items``, merge the
    two with overlapping windows whose merged window (one forward, a backward per packed
    class) saves most by :func:`_cost`, until no merge saves (issue 25.5: overlapping fields
    of a grid). Disjoint windows are not merged: their forwards share no pixel, and merging
    small crops for the overhead alone measured slower (resnet50 ``layer1`` at 640 px)."""
    total = math.prod(spatial)
    out = list(items)
    cost = [_items_cost([item], backwards, total) for item in out]
    while True:
        best: tuple[float, int, int, Window | None, float] | None = None
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                (wa, ua), (wb, ub) = out[i], out[j]
                if wa is not None and wb is not None and not wa.overlaps(wb):
                    continue
                w = None if wa is None or wb is None else _union([wa, wb], spatial)
                merged = _items_cost([(w, ua + ub)], backwards, total)
                gain = cost[i] + cost[j] - merged
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, i, j, w, merged)
        if best is None:
            return out
        _, i, j, w, merged = best
        out[i], cost[i] = (w, out[i][1] + out[j][1]), merged
        del out[j], cost[j]


def plan_groups(
    units: Mapping[str, Sequence[Index]],
    trfs: Mapping[str, Mapping[Index, TRF]],
    spatial: tuple[int, ...],
    crop: CropOption,
    train_mode: bool,
    sized_padding: bool = False,
) -> list[Group]:
    """Group seed units by input window; the full-input group (if any) comes last.

    ``units[layer]`` lists the layer's seed units (in layer order), ``trfs[layer]`` maps a
    unit to its TRF; a unit without one is probed on the full input. ``sized_padding``: the
    model pads from its input's size (see the module docstring).
    """
    names = list(units)
    by_index = {name: dict(trfs.get(name) or {}) for name in names}
    if crop is False or train_mode:
        full = Group(None, [], pack=not train_mode)
        for name in names:
            full.add(name, units[name])
        return [full]
    total = math.prod(spatial)
    items: list[tuple[str, Window | None, list[Index]]] = []
    for name in names:
        known = {i: by_index[name][i] for i in units[name] if i in by_index[name]}
        unknown = [i for i in units[name] if i not in known]
        if unknown:
            items.append((name, None, unknown))
        if known:
            layer_items = _layer_items(known, spatial, crop, sized_padding)
            items += [(name, w, idxs) for w, idxs in layer_items]
    full = Group(None, [])
    groups: list[Group] = []

    def area(w: Window | None) -> int:
        return total if w is None else w.area

    for name, w, idxs in sorted(items, key=lambda item: -area(item[1])):
        if w is None:
            full.add(name, idxs)
            continue
        layer_trf = next(iter(by_index[name].values()))
        n_back = len(seeds.pack_units(idxs, unit_boxes({i: by_index[name].get(i) for i in idxs})))
        candidates = [full] if full.layers else []
        candidates += groups
        best: Group | None = None
        for g in candidates:
            gw = g.window
            g_area = area(gw)
            if gw is not None and not gw.contains(w):
                continue
            if not _aligned(gw, layer_trf, sized_padding):
                continue
            same = gw == w
            if not same and (crop is True or w.area < _merge_fraction(n_back) * g_area):
                continue
            if best is None or g_area < area(best.window):
                best = g
        if best is not None:
            best.add(name, idxs)
        else:
            groups.append(Group(w, [name], {name: list(idxs)}))
    rank = {name: i for i, name in enumerate(names)}
    out = [g for g in groups if g.layers]
    if full.layers:
        out.append(full)
    if crop == "auto":
        for name in names:
            out = _ride_along(out, name, by_index[name], total)
    for g in out:
        g.layers.sort(key=rank.__getitem__)
    return out


def _ride_along(
    groups: list[Group], name: str, trfs: Mapping[Index, TRF], total: int
) -> list[Group]:
    """The groups with ``name``'s own groups (whose forward runs for ``name`` alone) merged
    into the group of other layers that holds all their windows, when the extra backwards
    there cost less than those forwards and backwards (:func:`_cost`): that group's forward
    runs anyway and serves every unit whose window it contains (issue 25.5: a shallow layer's
    small crops beside a deeper layer probed on the full input). As in the join of
    :func:`plan_groups`, a forward made deeper by ``name`` is not counted."""
    own = [g for g in groups if g.layers == [name]]
    if not own or not trfs:
        return groups
    moved = [i for g in own for i in g.units.get(name, [])]

    def area(w: Window | None) -> int:
        return total if w is None else w.area

    def backwards(idxs: list[Index], pack: bool) -> int:
        boxes = unit_boxes({i: trfs.get(i) for i in idxs}) if pack else None
        return len(seeds.pack_units(idxs, boxes))

    alone = sum(_cost(area(g.window), backwards(g.units.get(name, []), g.pack)) for g in own)
    best: tuple[float, Group] | None = None
    for g in groups:
        if any(g is o for o in own) or not _aligned(g.window, next(iter(trfs.values()))):
            continue
        gw = g.window
        if gw is not None and not all(o.window and gw.contains(o.window) for o in own):
            continue
        have = g.units.get(name, [])
        extra = backwards(have + moved, g.pack) - backwards(have, g.pack)
        cost = float(area(gw)) ** _PIXEL_EXPONENT * _BACKWARD_COST * extra
        if cost < alone and (best is None or cost < best[0]):
            best = (cost, g)
    if best is None:
        return groups
    best[1].add(name, moved)
    return [g for g in groups if not any(g is o for o in own)]


def without_cropping(
    groups: list[Group], moved: Sequence[str], units: Mapping[str, Sequence[Index]]
) -> list[Group]:
    """The groups with the layers ``moved`` taken out of the cropped groups and probed whole
    (every unit of ``units[layer]``) in the full-input one."""
    out = []
    for g in groups:
        if g.window is None:
            continue
        kept = [n for n in g.layers if n not in moved]
        if kept:
            out.append(Group(g.window, kept, {n: g.units[n] for n in kept if n in g.units}))
    full = Group(None, [])
    for g in groups:
        if g.window is None:
            for n in g.layers:
                full.add(n, g.units.get(n, []))
    for n in moved:
        full.add(n, units[n])
    order = list(units)
    full.layers.sort(key=order.index)
    return [*out, full]


def crop_index(trf: TRF, index: Index, window: Window) -> Index:
    """Output unit ``index`` (full grid) as an index of the output of the cropped input."""
    strides = integer_strides(trf)
    assert strides is not None
    return tuple(c - a // s for c, a, s in zip(index, window.start, strides))


def margin_clear(grad: torch.Tensor, window: Window, spatial: tuple[int, ...]) -> bool:
    """Whether the gradient is zero on every cropped side's outermost row (outside the TRF)."""
    for d, (a, b, size) in enumerate(zip(window.start, window.stop, spatial)):
        dim = 2 + d
        if a > 0 and bool(grad.narrow(dim, 0, 1).any()):
            return False
        if b < size and bool(grad.narrow(dim, grad.shape[dim] - 1, 1).any()):
            return False
    return True
