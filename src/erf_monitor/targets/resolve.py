"""Targets: the one resolver every entry point uses to turn a layer spec into what is probed.

For a model, an input and a layer spec (names, globs, output selectors, ``"auto"``) it
returns one :class:`Target` per layer: the spec as the user spelled it (results are keyed by
it, wrapper prefixes and ``_orig_mod`` segments included), the module and output selector,
the output's shape and its *layout*: how the output maps onto a spatial grid.

Layouts, first rule that applies:

1. the user's ``token_layout`` for that layer;
2. what ``layers="auto"`` read when it picked the layer;
3. the output's shape: ``(N, K)`` is flat; ``(N, L, D)`` is a token sequence whose patch
   grid :func:`~erf_monitor.targets.tokens.resolve_layout` infers; ``(N, a, b, c)`` is
   channels-first ``(N, C, *S)`` when its module is a convolution, pooling or batch norm, or
   when only that reading's grid is the input downsampled (a channels-last map's grid always
   is); otherwise it is read from a recorded forward exactly as ``layers="auto"`` reads every
   module output (:mod:`erf_monitor.targets.auto`, rule 1): a channel norm over the last dim
   is channels-last, a block keeps the layout of the maps made inside it or of its input,
   and which grid is plausible after the grids before it. When that cannot tell
   (``(N, a, a, a)`` with no evidence), an error names both readings and how to choose.

So a Swin stage named by the user (``(N, 56, 56, 96)`` at 224 px) is read channels-last, as
``auto`` reads it, and never silently as 56 channels on a 56 x 96 grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from erf_monitor.targets.auto import GLOBAL_POOLS, GRID_MODULES, pick_layers, read_outputs
from erf_monitor.targets.layers import (
    Located,
    format_selector,
    locate_layers,
    module_table,
    unwrap_model,
)
from erf_monitor.targets.observe import ForwardFn, hooked_forward
from erf_monitor.targets.outputs import needs_selector_error
from erf_monitor.targets.small import note_dropped
from erf_monitor.targets.tokens import (
    ResolvedLayout,
    TokenLayout,
    TokenLayoutArg,
    layouts_for,
    resolve_layout,
)

__all__ = ["Target", "plausible_grid", "resolve_targets"]


@dataclass(frozen=True)
class Target(Located):
    """One probed layer, resolved: its :class:`~erf_monitor.targets.layers.Located` spec
    (``spec``, ``path``, ``module``, ``selector``) completed with its output.

    Attributes:
        shape: the selected output's shape on the input the targets were resolved with.
        layout: how that output maps onto a grid (``None``: ``(N, C, *S)`` or flat ``(N, K)``).
    """

    shape: tuple[int, ...]
    layout: ResolvedLayout | None

    @property
    def grid(self) -> tuple[int, ...]:
        """The output's spatial grid ``S'`` (``()`` for a flat output)."""
        if self.layout is not None:
            return tuple(self.layout.grid)
        return tuple(self.shape[2:]) if len(self.shape) > 2 else ()

    @property
    def tokens(self) -> bool:
        """Whether the output is read through a layout (tokens or channels-last)."""
        return self.layout is not None

    @property
    def token_layout(self) -> TokenLayout | None:
        """The layout as an explicit :class:`TokenLayout` (what the later stages are given)."""
        lay = self.layout
        if lay is None:
            return None
        if lay.channels_last:
            return TokenLayout(channels_last=True)
        return TokenLayout(
            grid=tuple(lay.grid), prefix_tokens=lay.prefix_tokens, suffix_tokens=lay.suffix_tokens
        )


#: The largest downsampling exponent (``S // 2**k``) and patch size a grid is read with.
_MAX_LOG2_STRIDE = 8
_MAX_PATCH = 64


def plausible_grid(grid: Sequence[int], spatial: Sequence[int]) -> bool:
    """Whether ``grid`` is the input grid ``spatial`` downsampled by one factor on every dim.

    Examples:
        >>> plausible_grid((56, 56), (224, 224)), plausible_grid((56, 96), (224, 224))
        (True, False)
        >>> plausible_grid((8, 8), (225, 225))  # 225 / 32, rounded up
        True
    """
    if len(grid) != len(spatial) or any(g < 1 for g in grid):
        return False
    for k in range(_MAX_LOG2_STRIDE + 1):
        f = 2**k
        if all(g in (s // f, -(-s // f)) for g, s in zip(grid, spatial)):
            return True
    return any(all(g * p == s for g, s in zip(grid, spatial)) for p in range(3, _MAX_PATCH + 1))


def _needs_evidence(module: nn.Module, shape: tuple[int, ...], spatial: tuple[int, ...]) -> bool:
    """Whether an output's layout needs the recorded forward: only an ``(N, a, b, c)`` output
    whose module is not channels-first by construction (a convolution, pooling, batch norm)
    and whose channels-last reading is plausible (a channels-last map's grid is always a
    downsampled input grid; when only the channels-first reading is one, that is it)."""
    if len(shape) != len(spatial) + 2 or isinstance(module, GRID_MODULES + GLOBAL_POOLS):
        return False
    return plausible_grid(shape[1:-1], spatial) or not plausible_grid(shape[2:], spatial)


def _ambiguous_error(spec: str, shape: tuple[int, ...]) -> ValueError:
    first, last = shape[2:], shape[1:-1]
    return ValueError(
        f"Layer {spec!r} returns a tensor of shape {shape}: {shape[1]} channels on a "
        f"{'x'.join(map(str, first))} grid (N, C, *S), or {shape[-1]} channels on a "
        f"{'x'.join(map(str, last))} grid (channels-last, N, *S, C)? Neither its shape nor the "
        f"model tells. Say which: token_layout={{{spec!r}: TokenLayout(channels_last=True)}} "
        "or TokenLayout(channels_last=False)."
    )


def _layout(
    spec: str,
    shape: tuple[int, ...],
    reading: str | None,
    spatial: tuple[int, ...],
    net: nn.Module,
) -> ResolvedLayout | None:
    """Rule 3 of the module docstring, for an output without a given layout."""
    nd = len(spatial)
    if len(shape) == 3 and nd >= 2:
        return resolve_layout(spec, shape, None, spatial, net)
    if len(shape) != nd + 2 or reading == "first":
        return None
    if reading == "last":
        return ResolvedLayout(tuple(shape[1:-1]), 0, True)
    if shape[1:-1] == shape[2:] and shape[1] == shape[-1] > 1:  # (N, 1, 1, 1) reads alike
        raise _ambiguous_error(spec, shape)
    return None


def resolve_targets(
    model: nn.Module,
    layers: str | Sequence[str] | Sequence[Located],
    x: torch.Tensor,
    forward_fn: ForwardFn | None = None,
    token_layout: TokenLayoutArg = None,
    known_shapes: Mapping[str, tuple[int, ...]] | None = None,
    table: dict[str, nn.Module] | None = None,
) -> list[Target]:
    """Resolve ``layers`` on ``model`` for inputs shaped like ``x`` (see the module docstring).

    ``layers`` may be located already (:func:`~erf_monitor.targets.layers.locate_layers`):
    they are then completed with their shapes and layouts, never looked up again.

    ``known_shapes``: output shapes (batch 1) of layer specs that the caller knows already
    (e.g. from a trace): no forward is run for those. ``table``: the model's
    :func:`~erf_monitor.targets.layers.module_table`, when the caller built it already.

    For ``"auto"``, the recorded forward of the pick tells every shape and layout. For named
    layers, one no-grad forward of ``x[:1]`` with hooks on the targets only (it stops at the
    deepest) tells their shapes, and the recorded forward (two samples, stopped at the
    deepest target) runs only when a layout needs its evidence. The caller puts the model in
    the mode it probes in.

    Raises:
        ValueError: unknown layer (close matches listed), a layer the forward never reaches,
            an output that is not a floating-point tensor, a layout that cannot be told.
    """
    net = unwrap_model(model)
    spatial = tuple(x.shape[2:])
    given: dict[str, TokenLayout] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    readings: dict[str, tuple[tuple[int, ...], str | None]] = {}
    if table is None:
        table = module_table(net)
    if isinstance(layers, str) and layers == "auto":
        pick = pick_layers(net, x[:2], forward_fn, table)
        specs, given, shapes = pick.names, dict(pick.layouts), dict(pick.shapes)
        # What auto read, it picked: channels-last picks carry their layout, others are maps.
        readings = {s: (shapes[s], "last" if s in given else "first") for s in specs}
    else:
        # the wrapped model: messages name it
        located = {t.spec: t for t in locate_layers(model, layers, table)}
        specs = list(located)
        shapes.update({s: tuple(v) for s, v in (known_shapes or {}).items() if s in specs})
    given.update(layouts_for(token_layout, specs))  # the user's layouts win
    if isinstance(layers, str) and layers == "auto":
        note_dropped(net, pick, x, forward_fn, table)  # stages a small input left out
        located = {t.spec: t for t in locate_layers(model, specs, table)}

    def take(spec: str, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            raise needs_selector_error(spec, out)
        if not out.is_floating_point():
            raise ValueError(
                f"Layer {spec!r} returned a {out.dtype} tensor, which has no gradient: watch "
                "a layer with a floating-point output."
            )
        shapes[spec] = tuple(out.shape)

    # (auto recorded its own)
    unread = {s: (located[s].module, located[s].selector) for s in specs if s not in shapes}
    if unread:
        with torch.no_grad():
            hooked_forward(net, forward_fn, x[:1], unread, take)
    unsure = []
    for s in specs:
        if s in given or s in readings or len(shapes[s]) != len(spatial) + 2:
            continue
        if _needs_evidence(located[s].module, shapes[s], spatial):
            unsure.append(s)
        else:
            readings[s] = (shapes[s], "first")
    if unsure:  # the recorded forward, read as ``auto`` reads it
        recorded = read_outputs(net, x[:2], forward_fn, {located[s].path for s in unsure}, table)
        for s in unsure:
            key = located[s].path + format_selector(located[s].selector)
            _shape, reading = recorded.get(key, (shapes[s], None))
            readings[s] = (shapes[s], reading)
    out = []
    for spec in specs:
        loc = located[spec]
        shape = shapes[spec]
        if spec in given:
            layout = resolve_layout(spec, shape, given[spec], spatial, net)
        else:
            layout = _layout(spec, shape, readings.get(spec, (shape, None))[1], spatial, net)
        _check_rank(spec, shape, layout, len(spatial))
        out.append(Target(spec, loc.path, loc.module, loc.selector, shape, layout))
    return out


def _check_rank(spec: str, shape: tuple[int, ...], layout: ResolvedLayout | None, nd: int) -> None:
    if layout is not None or len(shape) in (2, nd + 2):
        return
    raise ValueError(
        f"Layer {spec!r} returned a tensor of shape {shape}, but the input has {nd} spatial "
        f"dim(s): expected (N, C, *spatial) with {nd} spatial dims, or (N, K). Token "
        "sequences (N, L, D) and channels-last (N, *grid, C) outputs need "
        "token_layout=TokenLayout(...); otherwise watch a layer with a conv-like output."
    )
