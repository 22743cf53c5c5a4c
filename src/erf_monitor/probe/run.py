"""Running a plan: ERF maps of every target from one forward per group and batched backwards.

Design in one paragraph: a forward hook on each watched layer turns the layer's first output
into its seed units right away (layout applied, each unit indexed and *cloned*), so that
in-place operations later in the forward (``ReLU(inplace=True)``, ``out += identity``) cannot
change them: the backward then flows through the graph as it was when the hook ran. Once every
layer of the group has its seeds the forward is aborted (nothing deeper runs). For each layer
the scalar seed (``sum_{n,k} y[n, k, c']`` in Luo's mode, see :mod:`erf_monitor.core.modes`)
is differentiated w.r.t. the *input only* (``torch.autograd.grad``), so per-sample gradients
come out of one batched backward — samples do not interact in eval mode — and no parameter's
``.grad`` is touched. Should a later in-place op modify a tensor that the layer's own backward
needs, autograd's version counters refuse the backward, and that layer is probed again on its
own (its forward then stops in its hook, so nothing runs after it). Units of a cropped window
that cannot be reproduced exactly are probed again on the full input
(:mod:`erf_monitor.probe.crop`).

**Precision.** A seed that is (nearly) constant over inputs — the channel sum right after a
LayerNorm, as in a ConvNeXt stage at initialisation whose blocks add ``1e-6 * f(x)`` to a
normalised map — cancels in float32: its gradient is rounding noise. It is recognised by a
channel sum near zero in every sample, or (a LayerNorm with a non-zero bias) one that varies
by no more than ``_RESOLVE_RTOL`` of its scale over different inputs. Such a layer is probed
again in float64 (double copies of the parameters and buffers through
``torch.func.functional_call``; the model itself is not touched), where the cancellation
leaves the true map. Only a seed that is constant in float64 as well (a bare LayerNorm
output: its ERF is zero by construction) is warned about. A float16 or bfloat16 model is
probed in float32 by default, the same way (float32 copies of its half weights): half
arithmetic leaves its maps several percent off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from erf_monitor.core.errors import ERFProbeError
from erf_monitor.core.index import ModelIndex, index_of
from erf_monitor.core.modes import Mode, sample_maps, seed_value
from erf_monitor.probe import seeds
from erf_monitor.probe.crop import (
    Group,
    Index,
    crop_index,
    margin_clear,
    unit_boxes,
    without_cropping,
)
from erf_monitor.probe.lean import lean_forward, lean_modules
from erf_monitor.probe.plan import ProbePlan
from erf_monitor.targets.observe import ForwardFn, default_forward, hooked_forward
from erf_monitor.targets.tokens import tokens_to_spatial

__all__ = ["Maps", "is_degenerate", "run_plan"]

#: A seed is resolved in float64 when its sum over channels is below this fraction of the
#: sum of its absolute values (float32 then keeps fewer than ~4 significant digits of it) ...
_RESOLVE_RTOL = 1e-3
#: ... and is constant in truth when it stays below this fraction in float64.
_CONSTANT_RTOL = 1e-12

#: Samples per chunk when ``chunk_size`` is not given: at most this many ...
_DEFAULT_CHUNK = 32
#: ... and at most this many input pixels (CPU; other devices 4x as many).
_CHUNK_PIXELS_CPU = 2**20


def default_chunk(n: int, spatial: tuple[int, ...], device: torch.device) -> int:
    budget = _CHUNK_PIXELS_CPU * (1 if device.type == "cpu" else 4)
    return max(1, min(n, _DEFAULT_CHUNK, budget // max(math.prod(spatial), 1)))


@dataclass
class Maps:
    """What a probe accumulates per layer and seed unit over chunks (raw sums over samples).

    Attributes:
        sums: ``{(layer, unit): sum over samples of the per-sample maps}``.
        per_sample: ``{(layer, unit): [per-sample maps of each chunk]}`` (when kept).
        calls: how often each layer's module ran before the forward stopped.
        detached: layers whose seed's graph does not reach the input (no_grad / detach on
            the way).
        fell_back: layers whose cropped units were not reproduced and ran on the full input.
        rejected: layers whose cropped forward failed (e.g. a ViT with a fixed image size).
        constant: layers whose seed is constant even in float64 (zero map by construction).
        resolved: layers probed again in float64 (degenerate float32 seed).
        spreads: per layer, how its seed's channel sum varied over the samples so far.
        steady: layers found degenerate only by a non-zero constant channel sum (dead ReLUs
            before a bias give one too, with an exactly zero map).
    """

    sums: dict[tuple[str, Index], torch.Tensor] = field(default_factory=dict)
    per_sample: dict[tuple[str, Index], list[torch.Tensor]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    detached: set[str] = field(default_factory=set)
    fell_back: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    constant: set[str] = field(default_factory=set)
    resolved: set[str] = field(default_factory=set)
    spreads: dict[str, _Spread] = field(default_factory=dict)
    steady: set[str] = field(default_factory=set)

    def add(self, name: str, index: Index, maps: torch.Tensor, keep: bool) -> None:
        key = (name, index)
        self.sums[key] = self.sums[key] + maps.sum(0) if key in self.sums else maps.sum(0)
        if keep:
            self.per_sample.setdefault(key, []).append(maps)

    def drop(self, name: str) -> None:
        """Forget everything accumulated for ``name`` (it is probed again)."""
        for key in [k for k in self.sums if k[0] == name]:
            del self.sums[key]
            self.per_sample.pop(key, None)
        self.spreads.pop(name, None)


def is_degenerate(unit: torch.Tensor, rtol: float) -> bool:
    """Whether the channel sum of the seed unit ``(N, K)`` is below ``rtol`` times the sum of
    its absolute values for every sample (a (nearly) constant seed: see the module docstring).

    Examples:
        >>> y = torch.nn.functional.layer_norm(torch.randn(2, 8), (8,))
        >>> is_degenerate(y, 1e-3), is_degenerate(torch.rand(2, 8), 1e-3)
        (True, False)
    """
    if unit.dim() != 2 or unit.shape[1] < 2:
        return False
    with torch.no_grad():
        u = unit.detach().double()
        seed, scale = u.sum(1).abs(), u.abs().sum(1)
        return bool((scale > 0).all()) and bool((seed <= rtol * scale).all())


@dataclass
class _Spread:
    """The range of a seed's channel sum over the samples seen so far, the largest sum of its
    absolute values, the first sample's input window, and whether two different inputs
    were seen (two copies of one image say nothing about how the seed varies)."""

    low: float
    high: float
    scale: float
    first: torch.Tensor
    varied: bool

    def constant(self, rtol: float) -> bool:
        return self.varied and self.high - self.low <= rtol * self.scale


def _constant_over_samples(
    spreads: dict[str, _Spread], name: str, unit: torch.Tensor, x: torch.Tensor, rtol: float
) -> bool:
    """Whether the channel sum of ``name``'s seed unit ``(N, K)`` has varied by at most
    ``rtol`` times the sum of its absolute values over different input windows ``x`` (this
    chunk's and the earlier ones'): a constant seed cancels in float32 like a zero one."""
    if unit.dim() != 2 or unit.shape[1] < 2:
        return False
    with torch.no_grad():
        u = unit.detach().double()
        seed, scale = u.sum(1), float(u.abs().sum(1).max())
        xs = x.detach()
        s = spreads.get(name)
        if s is None or s.first.shape != xs.shape[1:]:
            s = spreads[name] = _Spread(math.inf, -math.inf, 0.0, xs[0].clone(), False)
        s.low, s.high = min(s.low, float(seed.min())), max(s.high, float(seed.max()))
        s.scale = max(s.scale, scale)
        s.varied = s.varied or bool((xs != s.first).any())
        return s.constant(rtol)


def _seed_unit(y: torch.Tensor, index: Index) -> torch.Tensor:
    """The seed unit ``(N, K)`` of a spatial output ``(N, K, *S')`` (a flat one is all of it).

    A clone: in-place operations after the hook cannot change its value, and its gradient
    flows through the graph as it was when the hook ran.
    """
    if y.dim() == 2:
        return y.clone()
    box: tuple[int | slice, ...] = (slice(None), slice(None), *index)
    return y[box].clone()


def _sum_seeds(units: list[torch.Tensor], mode: Mode) -> torch.Tensor:
    """The scalar differentiated for a class of seed units: the sum of their seeds."""
    total = seed_value(units[0], mode)
    for unit in units[1:]:
        total = total + seed_value(unit, mode)
    return total


def _check_finite(name: str, t: torch.Tensor, what: str, grid: Index) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ERFProbeError(
            f"Layer {name!r}: {what} contains NaN or Inf (output grid {grid}). The model or "
            "its weights produce non-finite values on the probe input; check for NaN weights "
            "or overflowing activations."
        )


def _no_graph_error(name: str) -> ERFProbeError:
    return ERFProbeError(
        f"Layer {name!r}: its output has no gradient path to the input: it is computed inside "
        "torch.no_grad(), under torch.utils.checkpoint(..., use_reentrant=True) (whose forward "
        "runs without gradients) or after .detach(). Use checkpoint(..., use_reentrant=False), "
        "or watch a layer outside that block."
    )


def _degenerate_mode(mode: Mode) -> bool:
    # RepLKNet's seed (a sum of relus) cannot cancel; OpenERF's channel mean can, as Luo's sum.
    return mode in ("luo", "openerf")


#: ``(unit class, its input gradient or None)`` pairs of one layer, ready to be added.
_Pairs = list[tuple[list[Index], torch.Tensor | None]]


def _group_input(x_chunk: torch.Tensor, group: Group) -> torch.Tensor:
    """The chunk (cropped to the group's window) as a fresh leaf that requires its gradient."""
    x = x_chunk.detach()
    if group.window is not None:
        box: tuple[slice, ...] = (slice(None), slice(None), *group.window.slices)
        x = x[box].contiguous()
    x.requires_grad_(True)
    return x


def _origin(group: Group, nd: int) -> Index:
    """Where the group's input starts on the full input (its window's corner, else zeros)."""
    return group.window.start if group.window is not None else (0,) * nd


def _capture_seeds(
    plan: ProbePlan, net: nn.Module, fwd: ForwardFn, x: torch.Tensor, group: Group
) -> tuple[dict[str, dict[Index, torch.Tensor]], dict[str, Index], dict[str, int]]:
    """The group's forward (stopped once every layer has its seeds): the seed units per layer
    (those its output has; window-local on a crop), each layer's output grid and its calls."""
    window = group.window
    targets = {t.spec: t for t in plan.targets}
    captured: dict[str, dict[Index, torch.Tensor]] = {n: {} for n in group.layers}
    grids: dict[str, Index] = {}

    def take(name: str, out: Any) -> None:
        lay = targets[name].layout
        y = tokens_to_spatial(out, lay) if lay is not None else out
        grids[name] = tuple(y.shape[2:])
        if not y.requires_grad:
            raise _no_graph_error(name)
        for idx in group.units.get(name, []):
            local = idx if window is None else crop_index(plan.unit_trfs[name][idx], idx, window)
            if all(0 <= i < g for i, g in zip(local, grids[name])):
                captured[name][idx] = _seed_unit(y, local)

    located = {n: (targets[n].module, targets[n].selector) for n in group.layers}
    calls = hooked_forward(net, fwd, x, located, take)
    return captured, grids, calls


def _live_layers(
    plan: ProbePlan,
    maps: Maps,
    captured: dict[str, dict[Index, torch.Tensor]],
    x: torch.Tensor,
    degenerate: set[str],
    resolve_rtol: float | None,
) -> list[str]:
    """The layers with seed units to differentiate: those whose seeds are degenerate below
    ``resolve_rtol`` are added to ``degenerate`` (and steady ones to ``maps.steady``) instead."""
    live = [n for n in captured if captured[n]]
    if resolve_rtol is None:
        return live
    for n in live:
        unit = next(iter(captured[n].values()))
        if not _degenerate_mode(plan.mode):
            continue
        if is_degenerate(unit, resolve_rtol):
            degenerate.add(n)
        elif _constant_over_samples(maps.spreads, n, unit, x, resolve_rtol):
            degenerate.add(n)
            maps.steady.add(n)
    return [n for n in live if n not in degenerate]


def _class_grads(
    mode: Mode,
    units: dict[Index, torch.Tensor],
    classes: list[list[Index]],
    boxes: dict[Index, seeds.Box] | None,
    x: torch.Tensor,
    retain: bool,
    origin: Index,
) -> _Pairs:
    """One backward per class of units; a shared gradient that leaks outside its units' TRFs
    is recomputed unit by unit (or, without ``retain``, the graph being gone, left out for the
    caller to probe unpacked)."""
    pairs: _Pairs = []
    grads = seeds.class_grads(
        [_sum_seeds([units[i] for i in cls], mode) for cls in classes], x, retain
    )
    for cls, grad in zip(classes, grads):
        if (
            len(cls) > 1
            and grad is not None
            and boxes is not None
            and not seeds.clear_outside(grad, [boxes[i] for i in cls], origin)
        ):
            if not retain:
                continue  # the graph is gone: the caller probes them unpacked
            # A TRF is wrong: one backward per unit (the consistency check names it).
            singles = seeds.class_grads([_sum_seeds([units[i]], mode) for i in cls], x, True)
            pairs += [([i], g) for i, g in zip(cls, singles)]
        else:
            pairs.append((cls, grad))
    return pairs


def _add_maps(
    plan: ProbePlan,
    maps: Maps,
    name: str,
    pairs: _Pairs,
    boxes: dict[Index, seeds.Box] | None,
    x: torch.Tensor,
    group: Group,
    grid: Index,
    keep_per_sample: bool,
) -> set[tuple[str, Index]]:
    """Adds each class's per-sample maps to ``maps`` (each unit's own part of a packed class,
    placed back on the full input from a crop); returns the ``(layer, unit)`` pairs added. A
    crop whose gradient reaches its margin adds nothing."""
    window, spatial = group.window, plan.spatial
    origin = _origin(group, len(spatial))
    done: set[tuple[str, Index]] = set()
    for cls, maybe_grad in pairs:
        if maybe_grad is None:  # autograd: the seed does not reach the input at all
            maps.detached.add(name)
        grad = torch.zeros_like(x) if maybe_grad is None else maybe_grad
        _check_finite(name, grad, "the ERF gradient", grid)
        if window is not None and not margin_clear(grad, window, spatial):
            continue
        per_sample = sample_maps(grad, plan.mode).detach()
        for idx in cls:
            if len(cls) > 1 and boxes is not None:
                m = seeds.restrict(per_sample, boxes[idx], origin)
            else:
                m = per_sample
            m = m.cpu()
            if window is not None:
                placed = m.new_zeros((m.shape[0], *spatial))
                rows: tuple[slice, ...] = (slice(None), *window.slices)
                placed[rows] = m
                m = placed
            maps.add(name, idx, m, keep_per_sample)
            done.add((name, idx))
    return done


def _probe_group(
    plan: ProbePlan,
    net: nn.Module,
    fwd: ForwardFn,
    x_chunk: torch.Tensor,
    group: Group,
    maps: Maps,
    keep_per_sample: bool,
    degenerate: set[str],
    resolve_rtol: float | None,
) -> tuple[set[tuple[str, Index]], list[str]]:
    """One forward (early exit) and input-only backwards of every seed unit of ``group``.

    Adds each unit's maps to ``maps`` and returns ``(done, alone)``: the ``(layer, unit)``
    pairs done, and the layers whose backward autograd refused because a later in-place op
    modified a tensor it needs (the caller probes each alone). A unit of a cropped group that
    cannot be reproduced exactly (the cropped forward fails, the cropped output lacks the
    unit, or the gradient reaches the crop margin) is not done, for the caller to run on the
    full input. Units with disjoint TRFs share a backward (``group.pack``); a shared gradient
    that is not zero outside their TRFs is recomputed unit by unit from the same forward (or,
    after the group's last backward, which frees the graph, left to the caller). Layers whose
    seeds are degenerate below ``resolve_rtol`` are added to ``degenerate`` and skipped.
    """
    window = group.window
    names = group.layers
    x = _group_input(x_chunk, group)
    origin = _origin(group, len(plan.spatial))
    try:
        captured, grids, calls = _capture_seeds(plan, net, fwd, x, group)
    except ERFProbeError as exc:
        if window is None or "no gradient path" in str(exc):
            raise
        maps.rejected.extend(names)  # e.g. a ViT that only accepts its own image size
        return set(), []
    except ValueError:
        if window is None:
            raise
        maps.rejected.extend(names)
        return set(), []
    done: set[tuple[str, Index]] = set()
    alone: list[str] = []
    live = _live_layers(plan, maps, captured, x, degenerate, resolve_rtol)
    # The group's last backward frees the graph (nothing may keep it alive afterwards).
    last_name = live[-1] if live else None
    try:
        for name in live:
            units = captured[name]
            grid = grids[name]
            for unit in units.values():
                _check_finite(name, unit, "its output at the seed unit", grid)
            boxes = unit_boxes({i: plan.unit_trfs.get(name, {}).get(i) for i in units})
            boxes = boxes if group.pack else None
            classes = seeds.pack_units(list(units), boxes)
            retain = name != last_name
            try:
                pairs = _class_grads(plan.mode, units, classes, boxes, x, retain, origin)
            except ERFProbeError:
                raise
            except RuntimeError as exc:
                if "modified by an inplace operation" in str(exc) and len(names) > 1:
                    alone.append(name)
                    continue
                raise ERFProbeError(
                    f"Layer {name!r}: the backward failed: {str(exc).splitlines()[0]}"
                ) from exc
            done |= _add_maps(plan, maps, name, pairs, boxes, x, group, grid, keep_per_sample)
            maps.calls[name] = max(maps.calls.get(name, 0), calls[name])
    finally:
        captured.clear()  # the seed units hold the graph: drop it now
        del x
    return done, alone


def _run_groups(
    plan: ProbePlan,
    net: nn.Module,
    fwd: ForwardFn,
    x_all: torch.Tensor,
    groups: list[Group],
    step: int,
    maps: Maps,
    keep_per_sample: bool,
    degenerate: set[str],
    resolve_rtol: float | None,
) -> None:
    """Every chunk of ``x_all`` through every group (units not reproduced on a crop run on
    the full input, and their layers are not cropped again)."""
    units = {n: list(dict.fromkeys(u.values())) for n, u in plan.units.items()}

    def run(group: Group, x_chunk: torch.Tensor) -> set[tuple[str, Index]]:
        done, alone = _probe_group(
            plan, net, fwd, x_chunk, group, maps, keep_per_sample, degenerate, resolve_rtol
        )
        for name in alone:  # its forward now stops in its own hook
            solo = Group(group.window, [name], {name: group.units.get(name, [])}, group.pack)
            more, _ = _probe_group(
                plan, net, fwd, x_chunk, solo, maps, keep_per_sample, degenerate, resolve_rtol
            )
            done |= more
        return done

    for start in range(0, x_all.shape[0], step):
        x_chunk = x_all[start : start + step].detach()
        redo = Group(None, [], pack=False)
        for group in groups:
            done = run(group, x_chunk)
            for name in group.layers:
                if name in degenerate:
                    continue
                missing = [i for i in group.units.get(name, []) if (name, i) not in done]
                if missing:
                    redo.add(name, missing)
        if redo.layers:  # these units were not reproduced: run them on the full input
            cropped = {n for g in groups if g.window is not None for n in g.layers}
            maps.fell_back += [n for n in redo.layers if n in cropped]
            run(redo, x_chunk)
            groups = without_cropping(groups, redo.layers, units)
        if degenerate:  # probed again below, in float64: skip them in later chunks
            groups = _without_layers(groups, degenerate)
        del x_chunk


def _without_layers(groups: list[Group], names: set[str]) -> list[Group]:
    out = []
    for g in groups:
        kept = [n for n in g.layers if n not in names]
        if kept:
            out.append(Group(g.window, kept, {n: g.units[n] for n in kept if n in g.units}, g.pack))
    return out


class _Call(nn.Module):
    """``forward_fn(net, x)`` as a module, so that ``functional_call`` can swap its weights."""

    def __init__(self, net: nn.Module, fwd: ForwardFn) -> None:
        super().__init__()
        self.net = net
        self.fwd = fwd

    def forward(self, x: torch.Tensor) -> Any:
        return self.fwd(self.net, x)


#: Dtypes whose parameters a float32 or float64 probe computes with in its own dtype.
_HALF = (torch.float16, torch.bfloat16)


def _cast_forward(net: nn.Module, fwd: ForwardFn, dtype: torch.dtype, half_only: bool) -> ForwardFn:
    """``fwd`` run with copies of the floating parameters and buffers of ``net`` in ``dtype``
    (all of them, or only the half-precision ones) through ``torch.func.functional_call``:
    the model's own tensors are never replaced or cast."""
    call = _Call(net, fwd)
    state = {
        name: t.detach().to(dtype)
        for name, t in [*call.named_parameters(), *call.named_buffers()]
        if t.is_floating_point() and (t.dtype in _HALF or not half_only)
    }

    def forward(_net: nn.Module, x: torch.Tensor) -> Any:
        return torch.func.functional_call(call, state, (x,))

    return forward


def _has_half(net: nn.Module | ModelIndex) -> bool:
    index = index_of(net)
    return any(t.dtype in _HALF for t in (*index.parameters, *index.buffers))


def run_plan(
    plan: ProbePlan,
    model: nn.Module,
    x_all: torch.Tensor,
    *,
    chunk_size: int | None = None,
    keep_per_sample: bool = False,
    index: ModelIndex | None = None,
) -> Maps:
    """Probe ``x_all`` (on the model's device, in the plan's dtype) with ``plan``: the raw maps
    of every seed unit (see the module docstring).

    The caller holds the model in the probe's state (:func:`~erf_monitor.probe.plan.probe_state`).
    ``index``: the model's index, when the caller took it already.
    """
    index = index_of(model) if index is None else index
    fwd = plan.forward_fn or default_forward
    if x_all.dtype not in _HALF and _has_half(index):
        # A half model probed in float32 (the default): float32 copies of its half weights.
        fwd = _cast_forward(model, fwd, x_all.dtype, half_only=True)
    lean = lean_modules(index)
    fwd = lean_forward(fwd, lean)
    step = chunk_size or default_chunk(x_all.shape[0], plan.spatial, x_all.device)
    maps = Maps()
    degenerate: set[str] = set()
    resolve = _RESOLVE_RTOL if x_all.dtype != torch.float64 else None
    _run_groups(plan, model, fwd, x_all, plan.groups, step, maps, keep_per_sample, degenerate,
                resolve)  # fmt: skip
    if not degenerate:
        return maps
    # Probed again in float64, on the full input; a seed constant even there is left as it
    # is (its map is rounding noise around zero) and warned about by the caller.
    # (Cropped as planned: float64 convolutions are several times slower on CPU.)
    maps.resolved |= degenerate
    for name in degenerate:
        maps.drop(name)
    groups = _without_layers(plan.groups, set(plan.names) - degenerate)
    fwd64 = _cast_forward(model, plan.forward_fn or default_forward, torch.float64, False)
    fwd64 = lean_forward(fwd64, lean)
    x64 = x_all.double()
    constant: set[str] = set()
    _run_groups(plan, model, fwd64, x64, groups, step, maps, keep_per_sample, constant,
                _CONSTANT_RTOL)  # fmt: skip
    if constant:
        maps.constant |= constant
        for name in constant:
            maps.drop(name)
        again = _without_layers(plan.groups, set(plan.names) - constant)
        _run_groups(plan, model, fwd64, x64, again, step, maps, keep_per_sample, set(), None)
    return maps
