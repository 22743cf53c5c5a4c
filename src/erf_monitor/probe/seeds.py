"""Several seed units of one layer from one forward: packing and batched backwards.

A probe of ``P`` positions of a layer runs one forward, keeps the ``P`` seed units, and
differentiates them w.r.t. the input. Two things make that cheaper than ``P`` probes:

* **Packing.** Units whose clipped TRF boxes are disjoint (with at least one pixel between
  them along some axis) share one backward: the gradient of the sum of their seeds is, pixel
  by pixel, the gradient of the one unit whose box holds the pixel (nothing outside a unit's
  TRF can reach it), and every mode's per-sample map is pixel-wise, so each unit's map is the
  joint map restricted to its box. Exact whenever the TRFs are; the joint gradient must be
  zero outside the union of the boxes, else the probe falls back to one backward per unit
  (and the consistency check then names the wrong TRF). Units are packed greedily, in order.
* **Batched backwards.** The packed classes of one layer are differentiated from one
  forward, the graph retained between them; on accelerators (``_BATCHED_DEVICES``) in one
  vmapped call (``torch.autograd.grad(..., is_grads_batched=True)``), with one call per
  class as the fallback. On CPU, one call per class was measured to be faster than the
  vmapped one (docs/benchmarks.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch

from erf_monitor.core.hints import input_grad

__all__ = ["Box", "class_grads", "clear_outside", "pack_units", "restrict"]

Index = tuple[int, ...]
#: An inclusive ``(start, end)`` per spatial dim (a TRF's ``clipped``).
Box = tuple[tuple[int, int], ...]

#: Device types on which the classes of a layer are differentiated in one vmapped call.
_BATCHED_DEVICES = frozenset({"cuda"})
#: At most this many classes per vmapped call (bounds the memory of the batched gradients).
_MAX_BATCHED = 16


def _apart(a: Box, b: Box) -> bool:
    """Whether two boxes have at least one pixel between them along some axis."""
    return any(ah + 1 < bl or bh + 1 < al for (al, ah), (bl, bh) in zip(a, b))


def pack_units(units: Sequence[Index], boxes: Mapping[Index, Box] | None) -> list[list[Index]]:
    """Classes of units that share a backward: pairwise :func:`_apart` boxes (greedy).

    Without ``boxes`` (no usable TRF) every unit is a class of its own.

    Examples:
        >>> boxes = {(0,): ((0, 2),), (1,): ((1, 3),), (5,): ((4, 6),)}
        >>> pack_units([(0,), (1,), (5,)], boxes)
        [[(0,), (5,)], [(1,)]]
    """
    if boxes is None:
        return [[u] for u in units]
    classes: list[list[Index]] = []
    for u in units:
        for cls in classes:
            if all(_apart(boxes[u], boxes[v]) for v in cls):
                cls.append(u)
                break
        else:
            classes.append([u])
    return classes


def _slices(box: Box, origin: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(lo - o, 0), max(hi + 1 - o, 0)) for (lo, hi), o in zip(box, origin))


def clear_outside(grad: torch.Tensor, boxes: Sequence[Box], origin: Sequence[int]) -> bool:
    """Whether ``grad`` ``(N, C, *w)`` (a window starting at ``origin``) is zero outside the
    union of ``boxes`` (input coordinates)."""
    keep = torch.zeros(grad.shape[2:], dtype=torch.bool, device=grad.device)
    for box in boxes:
        keep[_slices(box, origin)] = True
    return not bool(grad.detach()[:, :, ~keep].any())


def restrict(maps: torch.Tensor, box: Box, origin: Sequence[int]) -> torch.Tensor:
    """The per-sample maps ``(N, *w)`` with everything outside ``box`` set to zero."""
    out = torch.zeros_like(maps)
    rows: tuple[slice, ...] = (slice(None), *_slices(box, origin))
    out[rows] = maps[rows]
    return out


def class_grads(
    values: Sequence[torch.Tensor], x: torch.Tensor, retain_graph: bool
) -> list[torch.Tensor | None]:
    """``d values[i] / d x`` for each scalar, from the graph of one forward.

    ``retain_graph``: keep the graph after the last one (more layers follow). ``None`` where
    a value does not depend on ``x``. Autograd's errors (e.g. an in-place modification of a
    saved tensor) propagate.
    """
    out: list[torch.Tensor | None] = []
    start = 0
    if len(values) > 2 and x.device.type in _BATCHED_DEVICES:
        # All but the last in vmapped calls that keep the graph; the last one alone, so that
        # it frees the graph when asked to (nothing then keeps the graph alive).
        try:
            while start < len(values) - 1:
                part = values[start : min(start + _MAX_BATCHED, len(values) - 1)]
                eye = torch.eye(len(part), device=x.device, dtype=part[0].dtype)
                with warnings.catch_warnings():  # vmap's "performance drop" notes
                    warnings.simplefilter("ignore", UserWarning)
                    (g,) = torch.autograd.grad(
                        torch.stack(list(part)), x, eye, retain_graph=True,
                        allow_unused=True, is_grads_batched=True,
                    )  # fmt: skip
                out += [None] * len(part) if g is None else list(g.unbind(0))
                start += len(part)
        except RuntimeError as exc:
            if "modified by an inplace operation" in str(exc):
                raise
            # An op without a batching rule: one backward per class from here on.
    for i in range(start, len(values)):
        last = i == len(values) - 1
        (one,) = input_grad(  # torch.autograd.grad, its known refusals made plain
            values[i], x, retain_graph=retain_graph or not last, allow_unused=True
        )
        out.append(one)
    return out
