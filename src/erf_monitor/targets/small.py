"""Inputs too small for the layers asked for.

A layer whose output has a single unit along a spatial dim (resnet18's ``layer4`` on 8 x 8
images: 1 x 1) has nothing to seed but that unit, and its ERF is cut by the image on every
side: the ERF size, a coverage near 100% and an ERF/TRF ratio describe the image, not the
network. :func:`check_grids` warns once, naming each such layer, its output grid and the
smallest input that gives it a grid of at least 2 units per dim; :func:`note_dropped` says
which stages ``layers="auto"`` left out for the same reason (it picks only spatial maps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from erf_monitor.core.errors import ERFInputWarning
from erf_monitor.core.warn import warn
from erf_monitor.targets.auto import AutoPick, pick_layers
from erf_monitor.targets.observe import ForwardFn, hooked_forward
from erf_monitor.targets.outputs import Selector

__all__ = ["check_grids", "note_dropped", "smallest_input"]

#: The largest input side the search tries (beyond it, the layer is taken as global).
_MAX_SIDE = 1024


def _fmt(size: Sequence[int]) -> str:
    return "x".join(map(str, size))


def _grid(
    net: nn.Module, forward_fn: ForwardFn | None, located: tuple[nn.Module, Selector], x: Any
) -> tuple[int, ...] | None:
    """The spatial grid of the located output on ``x`` (``None``: the forward failed)."""
    found: list[tuple[int, ...]] = []

    def take(_spec: str, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            found.append(tuple(out.shape[2:]))

    try:
        with torch.no_grad():
            hooked_forward(net, forward_fn, x, {"t": located}, take)
    except Exception:  # too small for a kernel, or a model that takes one size only
        return None
    return found[0] if found else None


def smallest_input(
    net: nn.Module,
    located: tuple[nn.Module, Selector],
    example: torch.Tensor,
    forward_fn: ForwardFn | None = None,
) -> tuple[int, ...] | None:
    """The smallest input spatial size (the dims where the output has one unit grown
    together, the others kept) at which the located output has >= 2 units along every dim;
    ``None`` when none up to 1024 px does (global pooling: the layer is 1 x 1 by design).

    A few no-grad forwards of one zero image: doubling, then bisection."""
    spatial = tuple(example.shape[2:])
    shape = (1, *example.shape[1:2])

    def size(n: int) -> tuple[int, ...]:
        return tuple(max(s, n) for s in spatial)

    def ok(n: int) -> bool:
        x = example.new_zeros(*shape, *size(n))
        grid = _grid(net, forward_fn, located, x)
        return grid is not None and len(grid) == len(spatial) and all(g >= 2 for g in grid)

    lo = min(spatial)  # fails (the caller saw a one-unit grid)
    hi = max(2 * lo, 2)
    while not ok(hi):
        lo, hi = hi, 2 * hi
        if hi > _MAX_SIDE:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return size(hi)


def check_grids(
    net: nn.Module,
    targets: Sequence[Any],
    example: torch.Tensor,
    forward_fn: ForwardFn | None,
    global_dims: Mapping[str, Sequence[bool]],
) -> None:
    """Warn (:class:`ERFInputWarning`) about conv-like targets with a one-unit grid along a
    dim that is not global (``global_dims``: per layer, from the TRF geometry)."""
    spatial = tuple(example.shape[2:])
    small = []
    for t in targets:
        if t.layout is not None or len(t.shape) != len(spatial) + 2:
            continue  # token grids and flat outputs: not ours to judge
        glob = global_dims.get(t.spec, ())
        if not any(g == 1 and not (i < len(glob) and glob[i]) for i, g in enumerate(t.grid)):
            continue
        need = smallest_input(net, (t.module, t.selector), example, forward_fn)
        if need is not None:
            small.append(f"{t.spec!r} (output {_fmt(t.grid)}, needs >= {_fmt(need)} px)")
    if small:
        warn(
            f"Input {_fmt(spatial)} px is too small for {', '.join(small)}: an output with one "
            "unit along a dim has no spatial grid, its unit sees the image cut on every side, "
            "and its ERF size, coverage (near 100%) and ERF/TRF describe the image, not the "
            "network. Probe inputs at least that large.",
            ERFInputWarning,
        )


def note_dropped(
    net: nn.Module,
    pick: AutoPick,
    example: torch.Tensor,
    forward_fn: ForwardFn | None,
    table: Mapping[str, nn.Module],
) -> None:
    """Say which stages ``layers="auto"`` dropped because their output is 1 x 1 on this
    input: the picks on a larger input (>= 128 px a side, 2-D) that are 1 x 1 here."""
    if not pick.ones:
        return
    spatial = tuple(example.shape[2:])
    floor = 128 if len(spatial) <= 2 else 32
    if min(spatial) >= floor:
        return
    larger = example.new_zeros(min(example.shape[0], 2), example.shape[1],
                               *(max(s, floor) for s in spatial))  # fmt: skip
    try:
        bigger = pick_layers(net, larger, forward_fn, dict(table))
    except Exception:  # a model that takes one input size only
        return
    dropped = [n for n in bigger.names if n not in pick.names and n in pick.ones]
    if not dropped:
        return
    deepest = table.get(dropped[-1])
    need = None if deepest is None else smallest_input(net, (deepest, ()), example, forward_fn)
    hint = f"; an input of at least {_fmt(need)} px keeps them" if need is not None else ""
    warn(
        f"layers='auto' dropped {', '.join(dropped)}: their outputs are 1x1 on this "
        f"{_fmt(spatial)} input, with no spatial map to measure an ERF on{hint} (or name "
        "them in layers= to probe them anyway).",
        ERFInputWarning,
    )
