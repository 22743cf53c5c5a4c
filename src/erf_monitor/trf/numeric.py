"""The numeric TRF method: gradient supports of a float64 surrogate of the model.

The fallback behind :func:`~erf_monitor.trf.analysis.theoretical_rfs` when the fx walk cannot
follow a model (and ``method="numeric"``): a float64 copy whose gates pass everything and whose
max-pools sum (``_surrogate``), probed with random inputs; the in-bounds support of each unit's
input gradient is its clipped TRF. An op-by-op dispatch-mode tracker (``_DataDependence``)
marks fields whose sampling positions are computed from the input (data-dependent).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from erf_monitor.core.hints import input_grad
from erf_monitor.core.modes import seed_index
from erf_monitor.core.probing import probing
from erf_monitor.targets.layers import Located, locate_layer, module_table
from erf_monitor.targets.observe import ForwardFn, hooked_forward
from erf_monitor.targets.outputs import needs_selector_error
from erf_monitor.targets.tokens import TokenLayout, layouts_for, resolve_layout, tokens_to_spatial
from erf_monitor.trf.fx import (
    ntuple,
)
from erf_monitor.trf.types import TRF

log = logging.getLogger("erf_monitor")

#: ``units(layer, output grid, token output) -> {key: output index}``: the units analysed.
UnitsFn = Callable[[str, tuple[int, ...], bool], dict[str, tuple[int, ...]]]


def global_centre(c: int, s_in: int, s_out: int) -> float:
    return (c + 0.5) * s_in / s_out - 0.5


def hull(mask: np.ndarray) -> tuple[int, int]:
    nz = np.flatnonzero(mask)
    return (int(nz[0]), int(nz[-1])) if nz.size else (0, -1)


_GATES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.ELU, nn.CELU, nn.SELU,
)  # fmt: skip
_TRIALS = 2
_CHUNK = 16  # samples per forward/backward of the surrogate, at most ...
_CHUNK_BYTES = 2**30  # ... and about this much float64 activation memory (detectors resize)


def _chunk_size(sur: nn.Module, fwd: ForwardFn, x: Tensor) -> int:
    """Samples per surrogate chunk: the activations of one sample (a hooked no-grad forward,
    counting every module output once), times 8 bytes, kept within ``_CHUNK_BYTES``."""
    numel = [0]

    def count(_m: nn.Module, _i: Any, out: Any) -> None:
        numel[0] += sum(t.numel() for t in _tensors(out))

    handles = [m.register_forward_hook(count) for m in sur.modules()]
    try:
        with torch.no_grad():
            fwd(sur, x)
    except Exception:  # the real forward below reports failures
        return _CHUNK
    finally:
        for h in handles:
            h.remove()
    per_sample = 8 * max(numel[0], 1)  # float64; the depth of nesting roughly covers grads
    return max(1, min(_CHUNK, _CHUNK_BYTES // per_sample))


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _surrogate(net: nn.Module) -> nn.Module:
    """Float64 CPU deep copy whose gradient support is the structural receptive field."""
    # Fresh float64 parameters instead of copies of the user's (all get overwritten below).
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty(p.shape, dtype=torch.float64), p.requires_grad)
        for p in net.parameters()
        if p.is_floating_point()
    }
    sur = copy.deepcopy(net, memo).to(device="cpu", dtype=torch.float64).eval()
    gen = torch.Generator().manual_seed(0)
    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    for mod in sur.modules():
        for child_name, child in mod.named_children():
            new = _replacement(child)
            if new is not None:
                replacements.append((mod, child_name, new))
    for parent, child_name, new in replacements:
        setattr(parent, child_name, new)
    with torch.no_grad():
        for mod in sur.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                if mod.running_mean is not None:
                    mod.running_mean.zero_()
                if mod.running_var is not None:
                    mod.running_var.fill_(1.0)
            for pname, p in mod.named_parameters(recurse=False):
                if not p.is_floating_point():
                    continue
                if "bias" in pname:
                    p.zero_()
                elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    p.fill_(1.0)
                else:
                    fan_in = p[0].numel() if p.dim() >= 2 else 1
                    p.uniform_(0.1, 1.1, generator=gen).div_(fan_in)
    return sur


class _SumPool(nn.Module):
    """Sum over the window of a max-pooling module (same geometry, dilation and ceil_mode)."""

    def __init__(self, pool: nn.modules.pooling._MaxPoolNd) -> None:
        super().__init__()
        self.pool = pool
        self.nd = int(type(pool).__name__[-2])

    def forward(self, x: Tensor) -> Tensor:
        nd, p = self.nd, self.pool
        k = ntuple(p.kernel_size, nd)
        s = ntuple(p.stride or p.kernel_size, nd)
        pad = ntuple(p.padding, nd)
        dil = ntuple(p.dilation, nd)
        target = self.pool(x.detach()).shape[-nd:]
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        extra: list[int] = []
        for i in reversed(range(nd)):  # F.pad order: last dim first; pad, then right excess
            need = (target[i] - 1) * s[i] + dil[i] * (k[i] - 1) + 1
            have = x.shape[-nd + i] + 2 * pad[i]
            extra += [pad[i], pad[i] + max(need - have, 0)]
        c = x.shape[-nd - 1]
        weight = x.new_ones((c, 1, *k))
        return conv(F.pad(x, extra), weight, None, s, 0, dil, c)


def _replacement(m: nn.Module) -> nn.Module | None:
    if isinstance(m, _GATES):
        return nn.Identity()
    if isinstance(m, nn.modules.pooling._MaxPoolNd) and not m.return_indices:
        return _SumPool(m)
    if isinstance(m, nn.AdaptiveMaxPool1d):
        return nn.AdaptiveAvgPool1d(m.output_size)
    if isinstance(m, nn.AdaptiveMaxPool2d):
        return nn.AdaptiveAvgPool2d(m.output_size)
    if isinstance(m, nn.AdaptiveMaxPool3d):
        return nn.AdaptiveAvgPool3d(m.output_size)
    return None


def _support(grad: Tensor | None, nd: int) -> list[np.ndarray]:
    """Per spatial dim, the projection of ``|grad| > 0`` (grad of shape (1, C, *S))."""
    if grad is None:
        return []
    nz = (grad[0].abs() > 0).any(dim=0)
    out = []
    for d in range(nd):
        other = tuple(k for k in range(nd) if k != d)
        proj = nz.any(dim=other) if other else nz
        out.append(proj.numpy().astype(bool))
    return out


#: Ops that read their input at positions given by another tensor argument: ``(namespace,
#: op name) -> indices of the position arguments``. When a position argument is computed from
#: the model's input, the sampled positions depend on the data (deformable convolution,
#: ``grid_sample`` with a predicted grid, RoI pooling of predicted boxes, gathers with
#: computed indices): no finite receptive field exists.
_SAMPLING_OPS: dict[tuple[str, str], tuple[int, ...]] = {
    ("aten", "grid_sampler"): (1,),
    ("aten", "grid_sampler_2d"): (1,),
    ("aten", "grid_sampler_3d"): (1,),
    ("aten", "_grid_sampler_2d_cpu_fallback"): (1,),
    ("aten", "cudnn_grid_sampler"): (1,),
    ("torchvision", "deform_conv2d"): (2, 3),
    ("torchvision", "roi_align"): (1,),
    ("torchvision", "roi_pool"): (1,),
    ("torchvision", "ps_roi_align"): (1,),
    ("torchvision", "ps_roi_pool"): (1,),
    ("aten", "index"): (1,),
    ("aten", "_unsafe_index"): (1,),
    ("aten", "index_select"): (2,),
    ("aten", "gather"): (2,),
    ("aten", "take"): (1,),
    ("aten", "take_along_dim"): (1,),
    ("aten", "embedding"): (1,),
}


class _DataDependence(TorchDispatchMode):
    """Follows, op by op, which tensors are computed from the input ``x``, and which of those
    went through a data-dependent sampling op (with the op's name as the reason)."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self._alive: list[Tensor] = [x]  # keeps ids unique while the forward runs
        self._dependent: set[int] = {id(x)}
        self.reasons: dict[int, str] = {}

    def reason(self, t: Any) -> str:
        """Why ``t``'s sampling positions depend on the data ("" if they do not)."""
        return self.reasons.get(id(t), "") if isinstance(t, Tensor) else ""

    def _depends(self, value: Any) -> bool:
        leaves = torch.utils._pytree.tree_leaves(value)
        return any(isinstance(a, Tensor) and id(a) in self._dependent for a in leaves)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [
            a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, Tensor)
        ]
        if not any(id(a) in self._dependent for a in inputs):
            return out
        reason = next((self.reasons[id(a)] for a in inputs if id(a) in self.reasons), "")
        packet = getattr(func, "overloadpacket", None)
        key = (getattr(func, "namespace", ""), getattr(packet, "__name__", ""))
        positions = _SAMPLING_OPS.get(key, ())
        if not reason and any(i < len(args) and self._depends(args[i]) for i in positions):
            reason = f"{key[0]}::{key[1]} samples the input at positions computed from the input"
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, Tensor):
                self._alive.append(t)
                self._dependent.add(id(t))
                if reason:
                    self.reasons[id(t)] = reason
        return out


def _capture(
    sur: nn.Module,
    table: dict[str, nn.Module],
    names: list[str],
    fwd: ForwardFn,
    x: Tensor,
    layouts: Mapping[str, TokenLayout] | None = None,
    info: dict[str, tuple[bool, str, tuple[int, ...] | None]] | None = None,
    track: bool = True,
) -> dict[str, Tensor]:
    """Run the surrogate on ``x``; the first output of each layer (hooks always removed).

    Each output is cloned in its hook, so in-place ops later in the forward cannot change it.
    Token outputs are put on their patch grid (as the probe does), so that their centre unit
    is the centre patch token. ``layouts=None``: outputs are returned as they are. ``info``
    (if given) is filled with ``{layer: (token output, data-dependence reason)}``; with
    ``track`` the reason is found by following the forward op by op (slow: only for one
    small forward).
    """
    captured: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    tracker = _DataDependence(x) if info is not None and track else None

    def take(key: str, out: Any) -> None:
        if tracker is not None:
            reasons[key] = tracker.reason(out)
        captured[key] = out.clone() if isinstance(out, Tensor) else out

    located = {}
    for name in names:
        _, module, selector = locate_layer(sur, name, table)
        located[name] = (module, selector)
    with tracker if tracker is not None else contextlib.nullcontext():
        hooked_forward(sur, fwd, x, located, take, what="input")
    for name in names:
        out = captured[name]
        if not isinstance(out, Tensor) or not out.is_floating_point():
            raise needs_selector_error(name, out)
        tokens = None
        if layouts is not None:
            spatial = tuple(x.shape[2:])
            tokens = resolve_layout(name, tuple(out.shape), layouts.get(name), spatial, sur)
            if tokens is not None:
                captured[name] = tokens_to_spatial(out, tokens)
        if info is not None:
            patch = tokens.patch if tokens is not None else None
            info[name] = (tokens is not None, reasons.get(name, ""), patch)
    return captured


@probing()  # the surrogate is a copy of the model, with the user's hooks
def numeric_trfs(
    net: nn.Module,
    channels: int,
    spatial: tuple[int, ...],
    layers: Sequence[str] | Sequence[Located],
    forward_fn: ForwardFn | None,
    token_layout: TokenLayout | Mapping[str, TokenLayout] | None = None,
    mode: str = "luo",
    units: UnitsFn | None = None,
) -> dict[str, dict[str, TRF]]:
    # The surrogate is a copy: its layers are its own modules, looked up on its own table.
    names = [t.spec if isinstance(t, Located) else t for t in layers]
    sur = _surrogate(net)
    layouts = layouts_for(token_layout, names)
    table = module_table(sur)
    fwd: ForwardFn = forward_fn or (lambda m, t: m(t))
    nd = len(spatial)
    gen = torch.Generator().manual_seed(1)

    def rand(n: int) -> Tensor:
        return torch.rand((n, channels, *spatial), generator=gen, dtype=torch.float64) + 0.5

    info: dict[str, tuple[bool, str, tuple[int, ...] | None]] = {}
    x = rand(1)
    with torch.no_grad():
        try:
            outs = _capture(sur, table, names, fwd, x, layouts, info)
        except ValueError:
            # A model whose ops do not run under the dependence tracker (a torch dispatch
            # mode): no reason found, and the consistency check of every probe remains.
            info.clear()
            outs = _capture(sur, table, names, fwd, x, layouts, info, track=False)
        shapes = {k: tuple(v.shape) for k, v in outs.items()}
    grids = {k: shapes[k][2:] if len(shapes[k]) == nd + 2 else () for k in names}
    wanted = {
        k: (
            units(k, grids[k], info[k][0])
            if units is not None
            else {"centre": seed_index(mode, grids[k], info[k][0])}
        )
        for k in names
    }
    seeds = {k: list(dict.fromkeys(wanted[k].values())) for k in names}  # unique units
    dependent = {k: info[k][1] for k in names if info[k][1]}
    probed = [k for k in names if k not in dependent]
    chunk = _chunk_size(sur, fwd, torch.full((1, channels, *spatial), 0.5, dtype=torch.float64))
    # One sample per (trial, layer, unit): samples do not interact (eval mode), so a single
    # backward per batch gives every unit's gradient support. Job keys: "<i>:<role>" for the
    # i-th unique seed unit of the layer, "first" for the first unit (shared).
    supports: dict[str, dict[str, list[np.ndarray]]] = {n: {} for n in names}
    units_of: dict[str, dict[str, tuple[Any, ...]]] = {}
    for name in probed:
        units_of[name] = {}
        for i, idx in enumerate(seeds[name]):
            for role, unit in _numeric_units(shapes[name], nd, idx).items():
                units_of[name]["first" if role == "first" else f"{i}:{role}"] = unit
    jobs = [
        (name, key, unit)
        for _ in range(_TRIALS)
        for name in probed
        for key, unit in units_of[name].items()
        if key != "first"
    ]
    _run_jobs(sur, table, probed, fwd, rand, jobs, supports, nd, spatial, layouts, chunk)
    # The first unit is only needed to tell "global" from "sees the whole input".
    jobs = [
        (name, "first", units_of[name]["first"])
        for _ in range(_TRIALS)
        for name in probed
        if "first" in units_of[name]
        and any(
            hull(m) == (0, min(n, p * s_out) - 1) and s_out > 1
            for i in range(len(seeds[name]))
            for m, n, s_out, p in zip(
                supports[name][f"{i}:centre"], spatial, shapes[name][2:], info[name][2] or spatial
            )
        )
    ]
    _run_jobs(sur, table, probed, fwd, rand, jobs, supports, nd, spatial, layouts, chunk)
    out: dict[str, dict[str, TRF]] = {}
    for name in names:
        by_index: dict[tuple[int, ...], TRF] = {}
        for i, idx in enumerate(seeds[name]):
            if name in dependent:
                trf = data_dependent_trf(spatial, grids[name], idx, dependent[name], "numeric")
            else:
                sup = {
                    role.split(":", 1)[1]: masks
                    for role, masks in supports[name].items()
                    if role.startswith(f"{i}:")
                }
                if "first" in supports[name]:
                    sup["first"] = supports[name]["first"]
                trf = _numeric_trf(sup, spatial, grids[name], idx, info[name][2])
            by_index[idx] = replace(trf, tokens=info[name][0])
        out[name] = {key: by_index[idx] for key, idx in wanted[name].items()}
    return out


def data_dependent_trf(
    spatial: tuple[int, ...],
    out_spatial: tuple[int, ...],
    seed: tuple[int, ...],
    reason: str,
    method: Literal["fx", "numeric"],
) -> TRF:
    """The TRF of a unit that samples at data-dependent positions: no finite field."""
    nd = len(spatial)
    centre = seed if out_spatial else (0,) * nd
    grid = out_spatial or (1,) * nd
    return TRF(
        size=(math.inf,) * nd,
        stride=tuple(float(s / g) for s, g in zip(spatial, grid)),
        interval=((-math.inf, math.inf),) * nd,
        clipped=tuple((0, s - 1) for s in spatial),
        global_dims=(True,) * nd,
        centre=tuple(global_centre(c, s, g) for c, s, g in zip(centre, spatial, grid)),
        output_centre=tuple(seed),
        output_shape=tuple(out_spatial),
        input_shape=tuple(spatial),
        method=method,
        local=False,
        data_dependent=True,
        reason=reason,
    )


def _run_jobs(
    sur: nn.Module,
    table: dict[str, nn.Module],
    names: list[str],
    fwd: ForwardFn,
    rand: Callable[[int], Tensor],
    jobs: list[tuple[str, str, tuple[Any, ...]]],
    supports: dict[str, dict[str, list[np.ndarray]]],
    nd: int,
    spatial: tuple[int, ...],
    layouts: Mapping[str, TokenLayout] | None = None,
    step: int = _CHUNK,
) -> None:
    for start in range(0, len(jobs), step):
        chunk = jobs[start : start + step]
        x = rand(len(chunk)).requires_grad_(True)
        try:
            grad = _chunk_grad(sur, table, names, fwd, x, chunk, layouts)
        except RuntimeError as exc:
            if "modified by an inplace operation" not in str(exc) or len(names) < 2:
                raise
            # A later in-place op changed a tensor a watched layer's backward needs: one
            # forward per layer (each stops in its own hook).
            grad = torch.zeros_like(x)
            for name in names:
                rows = [i for i, job in enumerate(chunk) if job[0] == name]
                if rows:
                    xi = x.detach()[rows].requires_grad_(True)
                    part = _chunk_grad(sur, table, [name], fwd, xi, [chunk[i] for i in rows],
                                       layouts)  # fmt: skip
                    if part is not None:
                        grad[rows] = part
        for i, (name, key, _unit) in enumerate(chunk):
            g = grad[i : i + 1] if grad is not None else None
            masks = _support(g, nd) or [np.zeros(s, dtype=bool) for s in spatial]
            prev = supports[name].get(key)
            supports[name][key] = masks if prev is None else [a | b for a, b in zip(prev, masks)]


def _chunk_grad(
    sur: nn.Module,
    table: dict[str, nn.Module],
    names: list[str],
    fwd: ForwardFn,
    x: Tensor,
    chunk: list[tuple[str, str, tuple[Any, ...]]],
    layouts: Mapping[str, TokenLayout] | None,
) -> Tensor | None:
    with torch.enable_grad():
        outs = _capture(sur, table, names, fwd, x, layouts)
        seed = sum(
            (_unit_sum(outs[name], i, unit) for i, (name, _k, unit) in enumerate(chunk)),
            start=x.new_zeros(()),
        )
        (grad,) = input_grad(seed, x, allow_unused=True)
    return grad


def _unit_sum(out: Tensor, sample: int, unit: tuple[Any, ...]) -> Tensor:
    index = (sample, *unit)
    return out[index].sum()


def _numeric_units(
    shape: tuple[int, ...], nd: int, centre: tuple[int, ...]
) -> dict[str, tuple[Any, ...]]:
    """Index (without the batch index) of each unit whose support is needed: the seed unit
    ``centre``, the first unit, and per dim its next neighbour (its previous one at the end)."""
    if len(shape) != nd + 2:
        return {"centre": (Ellipsis,)}
    out_spatial = shape[2:]
    units: dict[str, tuple[Any, ...]] = {
        "centre": (slice(None), *centre),
        "first": (slice(None), *(0,) * nd),
    }
    for d in range(nd):
        nb = list(centre)
        if centre[d] + 1 < out_spatial[d]:
            nb[d] += 1
            units[f"next{d}"] = (slice(None), *nb)
        elif centre[d] > 0:
            nb[d] -= 1
            units[f"prev{d}"] = (slice(None), *nb)
    return units


def _numeric_trf(
    sup: dict[str, list[np.ndarray]],
    spatial: tuple[int, ...],
    out_spatial: tuple[int, ...],
    centre_idx: tuple[int, ...],
    pitch: tuple[int, ...] | None = None,
) -> TRF:
    """The TRF read off gradient supports (see ``_numeric_units``); ``pitch``: a token
    grid's patch size, its stride where the neighbour's support does not tell."""
    nd = len(spatial)
    size: list[float] = []
    stride: list[float] = []
    interval: list[tuple[float, float]] = []
    clipped: list[tuple[int, int]] = []
    glob: list[bool] = []
    centre: list[float] = []
    for d in range(nd):
        n = spatial[d]
        s_out = out_spatial[d] if out_spatial else 1
        c = centre_idx[d] if out_spatial else 0
        lo, hi = hull(sup["centre"][d])
        clipped.append((lo, hi))
        s_in = n if pitch is None else pitch[d] * s_out  # (a patch grid may leave pixels out)
        seen = (0, min(n, s_in) - 1)  # every pixel a unit can see
        first = sup.get("first")
        is_global = not out_spatial or (
            s_out > 1 and (lo, hi) == seen and first is not None and hull(first[d]) == seen
        )
        glob.append(is_global)
        jump: float = (s_out and n / s_out) if pitch is None else float(pitch[d])
        nxt, prv = sup.get(f"next{d}"), sup.get(f"prev{d}")
        # The unit and its neighbour, the lower index first (a unit at the end: its previous).
        pair = (
            ((lo, hi), hull(nxt[d]))
            if nxt is not None
            else (hull(prv[d]), (lo, hi))
            if prv is not None
            else None
        )
        if pair is not None and not is_global:
            (alo, ahi), (blo, bhi) = pair
            # (Units that share a support, e.g. tokens of one attention window, keep n / s_out.)
            if alo > 0 and blo > alo:
                jump = float(blo - alo)
            elif ahi < n - 1 and bhi < n - 1 and bhi > ahi:
                jump = float(bhi - ahi)
        stride.append(float(jump))
        if is_global or hi < lo:
            size.append(math.inf if is_global else 0.0)
            interval.append((-math.inf, math.inf) if is_global else (lo, hi))
            centre.append(global_centre(c, s_in, s_out))
        else:
            size.append(float(hi - lo + 1))
            interval.append((lo, hi))
            touches = lo == 0 or hi == n - 1
            centre.append(global_centre(c, s_in, s_out) if touches else (lo + hi) / 2)
    return TRF(
        size=tuple(size),
        stride=tuple(stride),
        interval=tuple(interval),
        clipped=tuple(clipped),
        global_dims=tuple(glob),
        centre=tuple(centre),
        output_centre=tuple(centre_idx),
        output_shape=tuple(out_spatial),
        input_shape=tuple(spatial),
        method="numeric",
        local=False,
    )
