"""The probe: ERF maps of several layers from one forward and batched backwards.

Design in one paragraph: a forward hook on each watched layer turns the layer's first output
into its seed right away (token layout applied, the seed unit indexed and *cloned*), so that
in-place operations later in the forward (``ReLU(inplace=True)``, ``out += identity``) cannot
change it: the backward then flows through the graph as it was when the hook ran. Once every
layer has its seed the forward is aborted (nothing deeper runs). For each layer the scalar
seed (``sum_{n,k} y[n, k, c']`` in Luo's mode, see :mod:`erf_monitor.core.modes`) is
differentiated w.r.t. the *input only* (``torch.autograd.grad``), so per-sample gradients come
out of one batched backward — samples do not interact in eval mode — and no parameter's
``.grad`` is touched. Should a later in-place op modify a tensor that the layer's own backward
needs, autograd's version counters refuse the backward, and that layer is probed again on its
own (its forward then stops in its hook, so nothing runs after it). The model gets a copy of
the input, so a model that normalises its input in place works too. Everything the probe
changes (training flags, every buffer, every RNG stream, hooks, autocast, compile stance) is
restored in ``finally``.

Positions (``position=``, :mod:`erf_monitor.targets.positions`): the hook keeps every requested
seed unit of the layer (the centre unit by default), each with its own TRF (the fx walk starts
at that unit); units whose clipped TRFs are disjoint share a backward and the rest reuse the
graph of the same forward (:mod:`erf_monitor.probe.seeds`). Cropping works per unit: a layer's
units run on one window around all of them or each on its own, whichever is estimated cheaper
(:func:`_layer_items`); everything below about "the centre unit" holds for each seed unit.

Every map is checked against the layer's TRF (the consistency check, on every probe): mass
outside a finite clipped TRF means the TRF is wrong; it is then reported unknown (warning
with the layer and the amount). Inputs with NaN/Inf values are refused.

Cropping (the fast path for inputs larger than a layer's TRF): nothing outside a layer's
clipped TRF can reach its centre unit, so when every operation on the way is local and
shift-equivariant with integer strides (``TRF.local``) the centre unit computed on a crop of
the input that contains the clipped TRF, starts at a multiple of the layer's effective stride
and keeps the zero padding of the real borders, is *exactly* the centre unit of the full
computation (it sits at ``output_centre - start // stride`` of the cropped output). Layers are
grouped by window (a layer joins a larger window when that is cheaper than a forward of its
own); each group costs one forward with early exit at its deepest layer and one input-only
backward per layer, and the cropped gradients are placed into full-size zero maps. Windows
keep a one-pixel margin outside the TRF: a non-zero gradient there would mean the TRF was
wrong, and the layer is then recomputed on the full input (with a warning). Layers whose TRF
is global, not local, not analysed (``trf="skip"``) or as large as the input, and every
layer in ``train_mode`` (BatchNorm statistics would see the crop), run on the full input.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from erf_monitor.core.buffers import preserved_buffers
from erf_monitor.core.errors import ERFProbeError, ERFProbeWarning
from erf_monitor.core.hints import check_not_meta, forward_error, is_own_error
from erf_monitor.core.modes import Mode, check_mode, sample_maps, seed_index, seed_value
from erf_monitor.core.rng import preserved_rng
from erf_monitor.measure.metrics import finalise_map
from erf_monitor.measure.result import ERFResult, ERFResults
from erf_monitor.probe import seeds as _seeds
from erf_monitor.targets.auto import pick_layers
from erf_monitor.targets.layers import locate_layer, resolve_layers, unwrap_compiled
from erf_monitor.targets.outputs import select_output, to_spatial, warn_if_degenerate_seed
from erf_monitor.targets.positions import (
    PositionRequest,
    PositionSpec,
    check_position,
    request,
)
from erf_monitor.targets.tokens import TokenLayout, layouts_for
from erf_monitor.trf.types import TRF, wrap_flags

__all__ = ["CropOption", "ForwardFn", "compute_erf"]

ForwardFn = Callable[[nn.Module, torch.Tensor], Any]


class _StopForward(BaseException):
    """Raised from a hook once every watched layer has produced its output.

    A ``BaseException`` so that a user's ``except Exception`` in ``forward`` cannot swallow it.
    """


def _default_forward(model: nn.Module, x: torch.Tensor) -> Any:
    return model(x)


@dataclass
class _Capture:
    """What a layer's forward hook kept of its first output."""

    calls: int = 0
    #: The seed units ``(N, K)``, cloned inside the hook, by their index on the full output
    #: grid (a unit that a cropped output does not hold is missing).
    units: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    grid: tuple[int, ...] = ()  # the output's spatial shape
    tokens: bool = False  # the output was read on its token grid
    error: Exception | None = None  # raised in the hook; re-raised after the forward


def _model_device_dtype(model: nn.Module, x: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    return x.device, torch.float32


@contextlib.contextmanager
def _probe_state(model: nn.Module, train_mode: bool, device: torch.device) -> Iterator[None]:
    """Put the model in the probe's mode and restore *everything* it may touch afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    with contextlib.ExitStack() as stack:
        # BatchNorm statistics in train mode, quantization observers and counters in any mode
        stack.enter_context(preserved_buffers(model))
        stack.enter_context(preserved_rng(device))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for dev_type in {"cpu", device.type}:
            if dev_type in ("cpu", "cuda"):
                stack.enter_context(torch.autocast(device_type=dev_type, enabled=False))
        stance = getattr(torch.compiler, "set_stance", None)
        if stance is not None:  # torch >= 2.6: compiled submodules run eagerly, no recompiles
            stack.enter_context(stance("force_eager"))
        try:
            model.train(train_mode)
            yield
        finally:
            for m, flag in flags:
                m.training = flag


def _non_finite_error(inputs: torch.Tensor) -> ValueError:
    bad = (~torch.isfinite(inputs.detach())).flatten(1).any(1).nonzero().flatten().tolist()
    shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
    return ValueError(
        f"The probe input of shape {tuple(inputs.shape)} contains NaN or Inf values (in "
        f"sample(s) {shown}): an ERF of non-finite inputs means nothing, so none is computed. "
        "Probe finite images."
    )


def _as_probe_input(inputs: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() < 3:
        raise ValueError(
            f"compute_erf needs a batch (N, C, *spatial) with 1 to 3 spatial dims; got shape "
            f"{tuple(inputs.shape)}, which has no spatial dims. Add the batch/channel dims "
            "(e.g. x[None] or x[:, None])."
        )
    if inputs.dim() > 5:
        raise ValueError(f"At most 3 spatial dims are supported; got shape {tuple(inputs.shape)}.")
    if not inputs.is_floating_point():
        raise TypeError(
            f"inputs must be floating point, got {inputs.dtype}: convert images first, e.g. "
            "x.float() / 255 and the model's normalisation (erf_monitor.load_images does both)."
        )
    if inputs.numel() and not bool(torch.isfinite(inputs.detach()).all()):
        raise _non_finite_error(inputs)
    # Cloning outside inference mode turns an inference tensor into a normal leaf.
    with torch.inference_mode(False):
        x = inputs.detach().to(device=device, dtype=dtype).clone()
    if not bool(torch.isfinite(x).all()):  # finite values that overflow the probe dtype
        raise _non_finite_error(x)
    return x.requires_grad_(True)


def proportional_centre(
    index: tuple[int, ...], grid: tuple[int, ...], spatial: tuple[int, ...]
) -> tuple[float, ...]:
    """Where output unit ``index`` of a ``grid`` would sit if it spread evenly over the input.

    ``(i + 0.5) * S / S' - 0.5`` per dim: the theoretical centre of a unit whose field is the
    whole input (a global dim); the input's middle for an output without a grid.
    """
    if not grid:
        return tuple((s - 1) / 2 for s in spatial)
    return tuple((i + 0.5) * s / g - 0.5 for i, s, g in zip(index, spatial, grid))


def _round_centre(
    centre: Sequence[float], spatial: tuple[int, ...], wrapped: Sequence[bool] = ()
) -> tuple[int, ...]:
    """Round half up, clamped into the input (modulo its size where the field wraps)."""
    return tuple(
        math.floor(c + 0.5) % s if w else min(max(math.floor(c + 0.5), 0), s - 1)
        for c, s, w in zip(centre, spatial, wrap_flags(wrapped, len(spatial)))
    )


def _forward_error(exc: Exception, x: torch.Tensor) -> ERFProbeError:
    return forward_error(exc, x)  # one line, with what to do (erf_monitor.core.hints)


#: ``take(name, output, capture)``: what a hook keeps of a layer's first output.
_Take = Callable[[str, Any, _Capture], None]


def _run_forward(
    net: nn.Module,
    forward_fn: ForwardFn,
    x: torch.Tensor,
    layers: Sequence[str],
    take: _Take,
) -> dict[str, _Capture]:
    """One forward with hooks; stops as soon as every layer has produced an output.

    Each layer's first output is handed to ``take`` inside the hook, before anything else in
    the forward can modify it. The model runs on a copy of ``x`` (differentiable), so that an
    in-place operation on its input changes neither ``x`` nor the gradient w.r.t. ``x``.
    """
    captures = {name: _Capture() for name in layers}
    pending = set(layers)
    handles = []
    located = {name: locate_layer(net, name) for name in layers}  # (module name, module, selector)

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            cap = captures[name]
            cap.calls += 1
            if cap.calls == 1:
                try:
                    take(name, select_output(out, located[name][2], name), cap)
                except Exception as exc:  # raised after the forward: the model may catch it
                    cap.error = exc
                pending.discard(name)
                if not pending:
                    raise _StopForward

        return hook

    try:
        for name in layers:
            handles.append(located[name][1].register_forward_hook(make_hook(name)))
        with contextlib.suppress(_StopForward):
            forward_fn(net, x.clone())
    except ERFProbeError:
        raise
    except Exception as exc:  # the user's model failed: say so, with the input shape
        if is_own_error(exc):  # e.g. an output selector that matches nothing
            raise
        raise _forward_error(exc, x) from None
    finally:
        for h in handles:
            h.remove()
    for name in layers:
        err = captures[name].error
        if err is not None:
            raise err
    missing = [n for n in layers if captures[n].calls == 0]
    if missing:
        raise ValueError(
            f"Layer(s) {missing} exist but were not called during the forward pass, so they have "
            "no ERF on this input. Check forward_fn (how the model is called) and that the "
            "layer is used by forward()."
        )
    return captures


def _seed_unit(out: torch.Tensor, index: tuple[int, ...]) -> torch.Tensor:
    """The seed unit ``(N, K)`` of a spatial output ``(N, K, *S')`` (a flat one is all of it).

    A clone: in-place operations after the hook cannot change its value, and its gradient
    flows through the graph as it was when the hook ran.
    """
    if out.dim() == 2:
        return out.clone()
    box: tuple[int | slice, ...] = (slice(None), slice(None), *index)
    return out[box].clone()


#: A layer is cropped only if its window is at most this fraction of the input (area).
_CROP_MAX_FRACTION = 0.9
#: A layer joins a larger group's window (no forward of its own) when its own window would be
#: at least this fraction of that window: a separate group costs ``F (1 + B) a`` against the
#: extra backward ``F B (b - a)`` (forward cost ``F`` per pixel to the layer, backward ``B F``
#: with ``B`` about 1), so sharing pays from ``a / b`` about 1/2 on.
_CROP_MERGE_FRACTION = 0.5
#: Samples per chunk when ``chunk_size`` is not given: at most this many ...
_DEFAULT_CHUNK = 32
#: ... and at most this many input pixels (CPU; other devices 4x as many).
_CHUNK_PIXELS_CPU = 2**20


def _default_chunk(n: int, spatial: tuple[int, ...], device: torch.device) -> int:
    budget = _CHUNK_PIXELS_CPU * (1 if device.type == "cpu" else 4)
    return max(1, min(n, _DEFAULT_CHUNK, budget // max(math.prod(spatial), 1)))


#: Pixels kept outside the TRF on every cropped side; the gradient there must be exactly zero.
_CROP_MARGIN = 1

CropOption = bool | Literal["auto"]


@dataclass(frozen=True)
class _Window:
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

    def contains(self, other: _Window) -> bool:
        return all(
            a <= c and d <= b for a, b, c, d in zip(self.start, self.stop, other.start, other.stop)
        )


Index = tuple[int, ...]


@dataclass
class _Group:
    """Seed units probed from one forward on one input window (``None``: the full input).

    ``units[layer]`` lists the output indices (on the full output grid) probed for the layer;
    a layer without an entry probes every requested position, resolved on its output grid in
    the hook (only in full-input groups). ``pack``: units with disjoint TRFs may share a
    backward (:mod:`erf_monitor.probe.seeds`).
    """

    window: _Window | None
    layers: list[str]
    units: dict[str, list[Index]] = field(default_factory=dict)
    pack: bool = True

    def add(self, name: str, indices: Sequence[Index]) -> None:
        if name not in self.layers:
            self.layers.append(name)
        if indices:
            have = self.units.setdefault(name, [])
            have += [i for i in indices if i not in have]


def _integer_strides(trf: TRF) -> tuple[int, ...] | None:
    strides = []
    for s in trf.stride:
        if not (math.isfinite(s) and s >= 1 and float(s).is_integer()):
            return None
        strides.append(int(s))
    return tuple(strides)


def _crop_window(trf: TRF | None, spatial: tuple[int, ...]) -> _Window | None:
    """The stride-aligned window (with margin) that reproduces the layer's centre unit exactly.

    ``None`` when the layer must run on the full input: no TRF, not local, global, a TRF for
    another input shape, non-integer strides, or a window as large as the input.
    """
    if trf is None or not trf.local or trf.is_global or trf.method != "fx":
        return None
    if tuple(trf.input_shape) != spatial or len(trf.clipped) != len(spatial):
        return None
    if len(trf.output_centre) != len(spatial):
        return None
    strides = _integer_strides(trf)
    if strides is None:
        return None
    start, stop = [], []
    for (lo, hi), (u_lo, u_hi), s, size in zip(trf.clipped, trf.interval, strides, spatial):
        # A field reaching beyond a border reads that border's padding (its in-bounds hull can
        # end earlier, between dilated taps): the window keeps the border, so that padding,
        # and the output grid that depends on it, stay as they are.
        a = 0 if u_lo < 0 else max(int(lo) - _CROP_MARGIN, 0)
        start.append(a - a % s)
        stop.append(size if u_hi > size - 1 else min(int(hi) + 1 + _CROP_MARGIN, size))
    window = _Window(tuple(start), tuple(stop))
    if window.shape == spatial:
        return None
    return window


def _aligned(window: _Window | None, trf: TRF | None) -> bool:
    if window is None:
        return True
    strides = None if trf is None else _integer_strides(trf)
    return strides is not None and all(a % s == 0 for a, s in zip(window.start, strides))


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


def _box(trf: TRF | None) -> _seeds.Box | None:
    """The clipped TRF box of a unit, when it may be packed: an exact (fx), finite field
    through local operations (what cropping trusts too)."""
    if trf is None or trf.method != "fx" or not trf.local or trf.is_global or trf.data_dependent:
        return None
    return tuple((int(lo), int(hi)) for lo, hi in trf.clipped)


def _boxes(units: Mapping[Index, TRF | None]) -> dict[Index, _seeds.Box] | None:
    """Every unit's box, or ``None`` when one of them cannot be packed."""
    out = {}
    for idx, trf in units.items():
        box = _box(trf)
        if box is None:
            return None
        out[idx] = box
    return out


def _union(windows: Sequence[_Window], spatial: tuple[int, ...]) -> _Window | None:
    """The smallest window holding every one (stride-aligned if they are); ``None``: the input."""
    start = tuple(min(w.start[d] for w in windows) for d in range(len(spatial)))
    stop = tuple(max(w.stop[d] for w in windows) for d in range(len(spatial)))
    return None if stop == spatial and not any(start) else _Window(start, stop)


def _layer_items(
    units: Mapping[Index, TRF], spatial: tuple[int, ...], crop: CropOption
) -> list[tuple[_Window | None, list[Index]]]:
    """How one layer's seed units are cropped: ``[(window, units)]``.

    ``crop=True``: each unit on its own window. ``"auto"``: one window around all of them
    (one forward, packed backwards) or one per unit, whichever :func:`_cost` says is
    cheaper.
    """
    total = math.prod(spatial)
    windows: dict[Index, _Window | None] = {}
    for idx, trf in units.items():
        w = _crop_window(trf, spatial)
        if w is not None and crop == "auto" and w.area > _CROP_MAX_FRACTION * total:
            w = None
        windows[idx] = w
    full = [i for i, w in windows.items() if w is None]
    own = [(w, [i]) for i, w in windows.items() if w is not None]
    split: list[tuple[_Window | None, list[Index]]] = [*own, *([(None, full)] if full else [])]
    if crop is True or len(units) == 1:
        return split
    boxes = _boxes(units)

    def backwards(idxs: list[Index]) -> int:
        return len(_seeds.pack_units(idxs, boxes))

    shared_window = None if full else _union([w for w, _ in own], spatial)
    shared = _cost(total if shared_window is None else shared_window.area, backwards(list(units)))
    separate = sum(_cost(w.area, 1) for w, _ in own)
    if full:
        separate += _cost(total, backwards(full))
    return [(shared_window, list(units))] if shared <= separate else split


def _plan_groups(
    names: Sequence[str],
    trfs: Mapping[str, Mapping[Index, TRF] | TRF | None],
    spatial: tuple[int, ...],
    crop: CropOption,
    train_mode: bool,
) -> list[_Group]:
    """Group seed units by input window; the full-input group (if any) comes last.

    ``trfs[layer]`` maps each seed unit of the layer to its TRF (one TRF: its unit only); a
    layer without any is probed on the full input, its units resolved on its output grid.
    """
    by_index = {
        name: {tuple(t.output_centre): t} if isinstance(t, TRF) else dict(t or {})
        for name, t in trfs.items()
    }
    if crop is False or train_mode:
        return [_Group(None, list(names), pack=not train_mode)]
    total = math.prod(spatial)
    items: list[tuple[str, _Window | None, list[Index]]] = []
    for name in names:
        units = by_index.get(name) or {}
        if not units:
            items.append((name, None, []))
            continue
        items += [(name, w, idxs) for w, idxs in _layer_items(units, spatial, crop)]
    full = _Group(None, [])
    groups: list[_Group] = []

    def area(w: _Window | None) -> int:
        return total if w is None else w.area

    for name, w, idxs in sorted(items, key=lambda item: -area(item[1])):
        if w is None:
            full.add(name, idxs)
            continue
        layer_trf = next(iter(by_index[name].values()))
        candidates = [full] if full.layers else []
        candidates += groups
        best: _Group | None = None
        for g in candidates:
            gw = g.window
            g_area = area(gw)
            if gw is not None and not gw.contains(w):
                continue
            if not _aligned(gw, layer_trf):
                continue
            same = gw == w
            if not same and (crop is True or w.area < _CROP_MERGE_FRACTION * g_area):
                continue
            if best is None or g_area < area(best.window):
                best = g
        if best is not None:
            best.add(name, idxs)
        else:
            groups.append(_Group(w, [name], {name: list(idxs)}))
    rank = {name: i for i, name in enumerate(names)}
    out = [g for g in groups if g.layers]
    if full.layers:
        out.append(full)
    for g in out:
        g.layers.sort(key=rank.__getitem__)
    return out


def _without_cropping(groups: list[_Group], moved: list[str], names: Sequence[str]) -> list[_Group]:
    """The plan with the layers ``moved`` taken out of the cropped groups and probed whole
    (every requested unit) in the full-input one."""
    out = []
    for g in groups:
        if g.window is None:
            continue
        kept = [n for n in g.layers if n not in moved]
        if kept:
            out.append(_Group(g.window, kept, {n: g.units[n] for n in kept if n in g.units}))
    full = _Group(None, [])
    for g in groups:
        if g.window is None:
            for n in g.layers:
                full.add(n, [] if n in moved else g.units.get(n, []))
    for n in moved:
        full.add(n, [])
        full.units.pop(n, None)
    full.layers.sort(key=list(names).index)
    return [*out, full]


def _crop_index(trf: TRF, index: Index, window: _Window) -> Index:
    """Output unit ``index`` (full grid) as an index of the output of the cropped input."""
    strides = _integer_strides(trf)
    assert strides is not None
    return tuple(c - a // s for c, a, s in zip(index, window.start, strides))


def _margin_clear(grad: torch.Tensor, window: _Window, spatial: tuple[int, ...]) -> bool:
    """Whether the gradient is zero on every cropped side's outermost row (outside the TRF)."""
    for d, (a, b, size) in enumerate(zip(window.start, window.stop, spatial)):
        dim = 2 + d
        if a > 0 and bool(grad.narrow(dim, 0, 1).any()):
            return False
        if b < size and bool(grad.narrow(dim, grad.shape[dim] - 1, 1).any()):
            return False
    return True


@dataclass
class _Acc:
    """What the probe accumulates per layer and seed unit over chunks."""

    sums: dict[tuple[str, Index], torch.Tensor] = field(default_factory=dict)
    per_sample: dict[tuple[str, Index], list[torch.Tensor]] = field(default_factory=dict)
    grids: dict[str, Index] = field(default_factory=dict)
    tokens: dict[str, bool] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    #: layers whose seed's graph does not reach the input (no_grad / detach on the way)
    detached: set[str] = field(default_factory=set)

    def add(self, name: str, index: Index, maps: torch.Tensor, keep: bool) -> None:
        key = (name, index)
        self.sums[key] = self.sums[key] + maps.sum(0) if key in self.sums else maps.sum(0)
        if keep:
            self.per_sample.setdefault(key, []).append(maps)


def _is_inplace_error(exc: RuntimeError) -> bool:
    return "modified by an inplace operation" in str(exc)


def _check_finite(name: str, t: torch.Tensor, what: str, grid: Index) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ERFProbeError(
            f"Layer {name!r}: {what} contains NaN or Inf (output grid {grid}). The model or "
            "its weights produce non-finite values on the probe input; check for NaN weights "
            "or overflowing activations."
        )


def _probe_group(
    net: nn.Module,
    fwd: ForwardFn,
    x_chunk: torch.Tensor,
    group: _Group,
    trfs: Mapping[str, Mapping[Index, TRF]],
    req: PositionRequest,
    spatial: tuple[int, ...],
    mode: Mode,
    acc: _Acc,
    keep_per_sample: bool,
    layouts: Mapping[str, TokenLayout] | None = None,
    rejected: list[str] | None = None,
    wanted: dict[str, list[Index]] | None = None,
) -> tuple[set[tuple[str, Index]], list[str]]:
    """One forward (early exit) and input-only backwards of every seed unit of ``group``.

    Adds each unit's maps to ``acc`` and returns ``(done, alone)``: the ``(layer, unit)``
    pairs done, and the layers whose backward autograd refused because a later in-place op
    modified a tensor it needs (the caller probes each alone). The units of each layer are
    recorded in ``wanted``. A unit of a cropped group that cannot be reproduced exactly (the
    cropped forward fails, the cropped output lacks the unit, or the gradient reaches the
    crop margin) is not done, for the caller to run on the full input. Units with disjoint
    TRFs share a backward (``group.pack``); a shared gradient that is not zero outside their
    TRFs is recomputed unit by unit from the same forward (or, after the group's last
    backward, which frees the graph, left to the caller).
    """
    window = group.window
    names = group.layers
    x = x_chunk.detach()
    if window is not None:
        box: tuple[slice, ...] = (slice(None), slice(None), *window.slices)
        x = x[box].contiguous()
    x.requires_grad_(True)
    nd = len(spatial)
    origin = window.start if window is not None else (0,) * nd

    def take(name: str, out: Any, cap: _Capture) -> None:
        y = to_spatial(
            name, out, nd, layout=(layouts or {}).get(name), model=net, input_spatial=spatial
        )
        cap.tokens = y is not out  # to_spatial returns conv-like and flat outputs as they are
        cap.grid = tuple(y.shape[2:])
        units = group.units.get(name)
        if units is None:
            units = list(dict.fromkeys(req.indices(cap.grid, mode, cap.tokens, name).values()))
        if wanted is not None:
            wanted[name] = list(units)
        for idx in units:
            local = idx if window is None else _crop_index(trfs[name][idx], idx, window)
            if all(0 <= i < g for i, g in zip(local, cap.grid)):
                cap.units[idx] = _seed_unit(y, local)

    try:
        captures = _run_forward(net, fwd, x, names, take)
    except (ValueError, ERFProbeError):
        if window is None:
            raise
        if rejected is not None:  # e.g. a ViT that only accepts its own image size
            rejected.extend(names)
        return set(), []
    done: set[tuple[str, Index]] = set()
    alone: list[str] = []
    # The group's last backward frees the graph (nothing may keep it alive afterwards).
    last_name = next((n for n in reversed(names) if captures[n].units), None)
    try:
        for name in names:
            cap = captures[name]
            if not cap.units:  # cropped output without any of the seed units
                continue
            retain = name != last_name
            for unit in cap.units.values():
                _check_finite(name, unit, "its output at the seed unit", cap.grid)
            # The degenerate case (a constant channel sum or mean) is the same in both modes.
            warn_if_degenerate_seed(name, next(iter(cap.units.values())),
                                    "luo" if mode == "openerf" else mode)  # fmt: skip
            boxes = _boxes({i: trfs.get(name, {}).get(i) for i in cap.units})
            boxes = boxes if group.pack else None
            classes = _seeds.pack_units(list(cap.units), boxes)
            pairs: list[tuple[list[Index], torch.Tensor | None]] = []
            try:
                grads = _seeds.class_grads(
                    [sum_seeds([cap.units[i] for i in cls], mode) for cls in classes], x, retain
                )
                for cls, grad in zip(classes, grads):
                    if (
                        len(cls) > 1
                        and grad is not None
                        and boxes is not None
                        and not _seeds.clear_outside(grad, [boxes[i] for i in cls], origin)
                    ):
                        if not retain:
                            continue  # the graph is gone: the caller probes them unpacked
                        # A TRF is wrong: one backward per unit (the consistency check names it).
                        singles = _seeds.class_grads(
                            [sum_seeds([cap.units[i]], mode) for i in cls], x, True
                        )
                        pairs += [([i], g) for i, g in zip(cls, singles)]
                    else:
                        pairs.append((cls, grad))
            except ERFProbeError:
                raise
            except RuntimeError as exc:
                if _is_inplace_error(exc) and len(names) > 1:
                    alone.append(name)
                    continue
                raise ERFProbeError(
                    f"Layer {name!r}: the backward failed: {str(exc).splitlines()[0]}"
                ) from exc
            for cls, maybe_grad in pairs:
                if maybe_grad is None:  # autograd: the seed does not reach the input at all
                    acc.detached.add(name)
                grad = torch.zeros_like(x) if maybe_grad is None else maybe_grad
                _check_finite(name, grad, "the ERF gradient", cap.grid)
                if window is not None and not _margin_clear(grad, window, spatial):
                    continue
                maps = sample_maps(grad, mode).detach()
                for idx in cls:
                    if len(cls) > 1 and boxes is not None:
                        m = _seeds.restrict(maps, boxes[idx], origin)
                    else:
                        m = maps
                    m = m.cpu()
                    if window is not None:
                        placed = m.new_zeros((m.shape[0], *spatial))
                        rows: tuple[slice, ...] = (slice(None), *window.slices)
                        placed[rows] = m
                        m = placed
                    acc.add(name, idx, m, keep_per_sample)
                    done.add((name, idx))
            if window is not None:
                layer_trf = next(iter(trfs[name].values()))
                acc.grids[name] = tuple(layer_trf.output_shape)
                acc.tokens[name] = layer_trf.tokens
            else:
                acc.grids[name] = cap.grid
                acc.tokens[name] = cap.tokens
            acc.calls[name] = max(acc.calls.get(name, 0), cap.calls)
    finally:
        del captures, x
    return done, alone


def sum_seeds(units: Sequence[torch.Tensor], mode: Mode) -> torch.Tensor:
    """The scalar differentiated for a class of seed units: the sum of their seeds."""
    total = seed_value(units[0], mode)
    for unit in units[1:]:
        total = total + seed_value(unit, mode)
    return total


def _layouts_by_name(
    token_layout: TokenLayout | Mapping[str, TokenLayout] | None, names: Sequence[str]
) -> dict[str, TokenLayout]:
    """``token_layout`` as ``{layer: TokenLayout}`` for the probed layers (names or globs)."""
    return layouts_for(token_layout, names)


#: What ``trf=`` may hold per layer: one TRF, several (one per seed unit), or none.
GivenTRF = TRF | Sequence[TRF] | Mapping[Any, TRF] | None


def _usable_trfs(
    trfs: Mapping[str, GivenTRF],
    names: Sequence[str],
    spatial: tuple[int, ...],
    mode: Mode,
    req: PositionRequest,
) -> dict[str, dict[str, TRF]]:
    """Given TRFs that describe a probed unit on this input shape, by position key; the
    others dropped, with a warning."""
    out: dict[str, dict[str, TRF]] = {}
    for name in names:
        entry = trfs.get(name)
        given: list[TRF] = (
            []
            if entry is None
            else [entry]
            if isinstance(entry, TRF)
            else list(entry.values())
            if isinstance(entry, Mapping)
            else list(entry)
        )
        out[name] = {}
        for t in given:
            why = ""
            keys: list[str] = []
            if tuple(t.input_shape) != spatial:
                why = f"it was computed for input shape {tuple(t.input_shape)}, not {spatial}"
            else:
                grid = tuple(t.output_shape)
                wanted = req.indices(grid, mode, t.tokens, name)
                keys = [k for k, idx in wanted.items() if idx == tuple(t.output_centre)]
                if not keys and req.is_default:
                    why = (
                        f"it describes output unit {tuple(t.output_centre)}, but mode={mode!r} "
                        f"seeds unit {seed_index(mode, grid, t.tokens)} "
                        "(compute it with theoretical_rf(..., mode=mode))"
                    )
                elif not keys:
                    why = (
                        f"it describes output unit {tuple(t.output_centre)}, which is none of "
                        f"the probed units {sorted(set(wanted.values()))}"
                    )
            if why:
                warnings.warn(
                    f"Layer {name!r}: the TRF passed is not used: {why}.",
                    ERFProbeWarning,
                    stacklevel=4,
                )
                continue
            for k in keys:
                out[name][k] = t
    return out


def _geometry(
    net: nn.Module,
    input_shape: tuple[int, ...],
    names: Sequence[str],
    forward_fn: ForwardFn | None,
    layouts: Mapping[str, TokenLayout],
    mode: Mode,
    req: PositionRequest,
) -> dict[str, dict[str, TRF]]:
    """The TRF analysis used only for the seed units' theoretical centres (silent; ``{}`` if
    the model cannot be analysed)."""
    from erf_monitor.trf.analysis import theoretical_rfs

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return theoretical_rfs(
                net, input_shape, names, req, forward_fn=forward_fn, token_layout=layouts,
                mode=mode,
            )  # fmt: skip
    except Exception:
        return {}


def mass_outside(total: torch.Tensor, trf: TRF) -> float:
    """Fraction of a map's mass outside the clipped TRF box (0.0 exactly when none is)."""
    box = tuple(slice(int(lo), int(hi) + 1) for lo, hi in trf.clipped)
    outside = total.detach().double().abs().clone()
    outside[box] = 0.0
    spill = float(outside.sum())
    if spill == 0.0:
        return 0.0
    return spill / float(total.detach().double().abs().sum())


def compute_erf(
    model: nn.Module,
    inputs: torch.Tensor,
    layers: str | Sequence[str] = "auto",
    *,
    mode: Mode = "luo",
    num_samples: int | None = None,
    chunk_size: int | None = None,
    forward_fn: ForwardFn | None = None,
    train_mode: bool = False,
    dtype: torch.dtype | None = None,
    keep_per_sample: bool = False,
    trf: Mapping[str, GivenTRF] | Literal["auto", "skip"] = "auto",
    crop: CropOption = "auto",
    token_layout: TokenLayout | Mapping[str, TokenLayout] | None = None,
    position: PositionSpec = "centre",
) -> ERFResults:
    """ERF maps of several layers from one probe, at the centre unit or any other units.

    Args:
        model: any ``nn.Module`` (a ``torch.compile``'d one is probed eagerly; a
            ``DataParallel``/DDP wrapper through the module it wraps, which ``forward_fn``
            then receives).
        inputs: probe batch ``(N, C, *S)`` with 1 to 3 spatial dims, finite. Never modified.
        layers: layer names (as in ``model.named_modules()``, optionally followed by an
            output selector such as ``"backbone['0']"`` or ``"stage[0]"`` for modules that
            return tuples, dicts or ``ModelOutput``s), globs, or ``"auto"`` (one layer per
            spatial stage, deepest last; see the Models and layers guide).
        mode: the published convention to follow (exact definitions in
            ``docs/concepts.md``; every result records it): ``"luo"`` (Luo et al.: mean over
            samples of the channel-summed ``|gradient|``), ``"replknet"`` (RepLKNet's
            ``visualize_erf.py`` + ``analyze_erf.py``: relu seed, channel sum of the relu'd
            gradient, mean over samples, then ``log10(x + 1) / max``) or ``"openerf"``
            (OpenERF / Kim et al. 2023: channel-mean seed, upper-left central token on even
            token grids, clamped channel mean of the gradient, normalised to total mass 1).
        num_samples: use only the first ``num_samples`` of ``inputs``.
        chunk_size: probe at most this many samples at a time (bounds memory; maps are
            accumulated exactly). Default ``None``: at most 32 samples and at most about
            2**20 input pixels per chunk on CPU (2**22 elsewhere): larger CPU batches of
            large images were measured to run up to 2x slower per sample, and memory stays
            bounded for probes of many samples.
        forward_fn: ``forward_fn(model, x)`` runs the model on an image batch (default
            ``model(x)``); for models whose ``forward`` does not take the image directly.
        train_mode: probe in train mode. Then BatchNorm mixes samples (maps are no longer
            per-sample) and dropout is active; buffers and RNG are still restored.
        dtype: dtype of the probe inputs; default float32 (or the parameters' dtype for
            half models). The model is not cast: a float64 probe needs a float64 model.
            Autocast is disabled during the probe.
        keep_per_sample: also return the per-sample maps ``(N, *S)`` (before the mode's
            normalisation over samples).
        trf: precomputed TRFs per layer (from :func:`theoretical_rf` with the same ``mode``,
            input shape and position; several per layer for several positions; others are
            warned about and not used), ``"auto"`` to compute them, or ``"skip"`` not to
            report or use any (``ratio`` is then NaN and nothing is cropped). Metrics do not
            depend on this choice: they are centred on the seed unit's theoretical centre,
            which comes from the layer geometry in every case.
        crop: run each layer's forward and backward on a stride-aligned crop of the input
            that contains its TRF (exact: nothing outside the TRF reaches the seed unit).
            ``"auto"`` crops where the window is clearly smaller than the input and shares
            windows between layers (and between the positions of a layer) where that is
            cheaper; ``True`` crops every layer and position that can be cropped, each to
            its own window; ``False`` never crops. Layers with a global, non-local or
            unknown TRF (``trf="skip"``), and ``train_mode``, always use the full input.
        token_layout: how token outputs map onto the patch grid: one
            :class:`~erf_monitor.TokenLayout` for every layer with a token output, or
            ``{layer or glob: TokenLayout}``. Token sequences ``(N, L, D)`` of
            torchvision/timm ViTs and of grids that the shapes determine uniquely are mapped
            automatically;
            channels-last (Swin-style) outputs ``(N, H', W', C)`` need
            ``TokenLayout(channels_last=True)``. The seed is the centre patch token.
        position: which output unit of each layer is seeded (``docs/guides/positions.md``):
            ``"centre"`` (default); an output index per spatial dim, ``(0, -1)`` (negative
            from the end); a fraction of the output plane per dim, ``(0.0, 0.5)`` (index
            ``min(floor(f * S'), S' - 1)``; an int is an index, a float a fraction); or a
            set: ``"corners"``, ``"edges"``, a ``k x k`` grid ``"grid:k"`` / ``("grid", k)``,
            or a list of positions. A set is probed in one forward per layer (units with
            disjoint TRFs share a backward); each result's metrics are centred on its own
            unit's theoretical centre.

    Returns:
        An ordered mapping ``layer -> ERFResult``. With one position, each layer's result
        is that unit's (``result.position``, ``result.output_index``); with a set, it is
        the centre unit's and ``result.field`` maps every position's key (the centre
        included) to its result, with ``field.border_ratio`` and ``field.figure()``.

    Raises:
        ValueError: unknown layer, a layer not reached, input without spatial dims or with
            NaN/Inf values, an output that is not conv-like.
        ERFProbeError: the forward failed, or the seed unit or a gradient contains NaN/Inf.

    Every random stream (torch CPU/CUDA, Python ``random``, NumPy's global generator) is left
    as it was. Each map is checked against its layer's TRF: mass outside a finite clipped TRF
    means the TRF is wrong, so it is reported unknown (``trf`` ``None``, ``trf_issue`` says
    why) with an :class:`~erf_monitor.ERFProbeWarning` naming the layer and the amount.

    Examples:
        >>> import torch, erf_monitor as em
        >>> net = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3, padding=1) for _ in range(2)])
        >>> res = em.compute_erf(net, torch.randn(2, 1, 9, 9), layers=["0", "1"])
        >>> res["1"].heatmap.shape, res["1"].trf.size
        (torch.Size([9, 9]), (5.0, 5.0))
        >>> bool(res["1"].heatmap[0, 0] == 0)  # outside the 5x5 TRF: no influence at all
        True
    """
    mode = check_mode(mode)
    check_position(position)
    if crop not in (True, False, "auto"):
        raise ValueError(f"crop must be True, False or 'auto', got {crop!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    check_not_meta(model, inputs)
    net = unwrap_compiled(model)
    device, _ = _model_device_dtype(net, inputs)
    with preserved_rng(device):
        return _compute_erf(
            model, net, inputs, layers, mode, num_samples, chunk_size, forward_fn, train_mode,
            dtype, keep_per_sample, trf, crop, token_layout, position,
        )  # fmt: skip


def _compute_erf(
    model: nn.Module,
    net: nn.Module,
    inputs: torch.Tensor,
    layers: str | Sequence[str],
    mode: Mode,
    num_samples: int | None,
    chunk_size: int | None,
    forward_fn: ForwardFn | None,
    train_mode: bool,
    dtype: torch.dtype | None,
    keep_per_sample: bool,
    trf: Mapping[str, GivenTRF] | Literal["auto", "skip"],
    crop: CropOption,
    token_layout: TokenLayout | Mapping[str, TokenLayout] | None,
    position: PositionSpec = "centre",
) -> ERFResults:
    fwd = forward_fn or _default_forward
    device, param_dtype = _model_device_dtype(net, inputs)
    if dtype is None:
        dtype = param_dtype if param_dtype in (torch.float16, torch.bfloat16) else torch.float32
    if num_samples is not None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        inputs = inputs[:num_samples]
    x_all = _as_probe_input(inputs, device, dtype)
    n, spatial = x_all.shape[0], tuple(x_all.shape[2:])
    if n == 0:
        raise ValueError("The probe batch is empty.")
    req = request(position, len(spatial))

    auto_layouts: dict[str, TokenLayout] = {}
    if isinstance(layers, str) and layers == "auto":
        with _probe_state(net, False, device):
            pick = pick_layers(net, x_all[:1].detach().clone(), fwd)
        names, auto_layouts = pick.names, pick.layouts
    else:
        names = resolve_layers(model, layers)  # the wrapped model: messages name the wrapper

    # TRFs and geometry by layer and position key.
    trfs: dict[str, dict[str, TRF]]
    geometry: Mapping[str, Mapping[str, TRF]]
    layouts = {**auto_layouts, **_layouts_by_name(token_layout, names)}
    input_shape = tuple(x_all.shape[1:])
    if trf == "auto":
        from erf_monitor.trf.analysis import theoretical_rfs

        trfs = theoretical_rfs(
            net, input_shape, names, req, forward_fn=forward_fn, token_layout=layouts, mode=mode
        )
        geometry = trfs
    elif trf == "skip":
        trfs = {}
        geometry = _geometry(net, input_shape, names, forward_fn, layouts, mode, req)
    else:
        trfs = _usable_trfs(trf, names, spatial, mode, req)
        geometry = trfs
        incomplete = [
            name
            for name in names
            if not trfs[name] or any(k not in trfs[name] for k in _keys_of(req, trfs[name]))
        ]
        if incomplete:  # positions without a given TRF: centres from the geometry
            more = _geometry(net, input_shape, incomplete, forward_fn, layouts, mode, req)
            geometry = {name: {**more.get(name, {}), **trfs[name]} for name in names}
    by_index = {name: {tuple(t.output_centre): t for t in units.values()} for name, units in
                trfs.items()}  # fmt: skip

    groups = _plan_groups(names, by_index, spatial, crop, train_mode)
    acc = _Acc()
    fell_back: list[str] = []
    rejected: list[str] = []  # cropped forward failed: a quiet fallback, not a TRF bug
    step = chunk_size or _default_chunk(n, spatial, device)

    def run(
        group: _Group, x_chunk: torch.Tensor, rejects: list[str] | None
    ) -> tuple[set[Any], dict[str, list[Index]]]:
        wanted: dict[str, list[Index]] = {n: list(u) for n, u in group.units.items()}
        done, alone = _probe_group(
            net, fwd, x_chunk, group, by_index, req, spatial, mode, acc, keep_per_sample,
            layouts, rejects, wanted,
        )  # fmt: skip
        for name in alone:  # its forward now stops in its own hook
            units = {name: group.units[name]} if name in group.units else {}
            more, _ = _probe_group(
                net, fwd, x_chunk, _Group(group.window, [name], units, group.pack), by_index,
                req, spatial, mode, acc, keep_per_sample, layouts, rejects, wanted,
            )  # fmt: skip
            done |= more
        return done, wanted

    with _probe_state(net, train_mode, device):
        for start in range(0, n, step):
            x_chunk = x_all[start : start + step].detach()
            redo = _Group(None, [], pack=False)
            for group in groups:
                done, wanted = run(group, x_chunk, rejected)
                for name in group.layers:
                    missing = [i for i in wanted.get(name, []) if (name, i) not in done]
                    if missing:
                        redo.add(name, missing)
            if redo.layers:  # these units were not reproduced: run them on the full input
                fell_back += [n for n in redo.layers if any(
                    g.window is not None and n in g.layers for g in groups)]  # fmt: skip
                run(redo, x_chunk, None)
                groups = _without_cropping(groups, redo.layers, names)
            del x_chunk

    results: dict[str, ERFResult] = {}
    estimated: list[str] = []
    for name in names:
        grid, tokens = acc.grids[name], acc.tokens[name]
        keyed = req.indices(grid, mode, tokens, name)
        by_key: dict[str, ERFResult] = {}
        zero: list[str] = []
        issues: dict[str, str] = {}
        for key, idx in keyed.items():
            total = acc.sums[(name, idx)]
            heat = finalise_map(total, n, mode)
            if not bool((heat > 0).any()):
                zero.append(key)
            unit_geometry = geometry.get(name, {}).get(key)
            centre, guessed = _unit_centre(unit_geometry, grid, idx, spatial)
            wrapped = () if guessed or unit_geometry is None else unit_geometry.wrapped
            if guessed and name not in estimated:
                estimated.append(name)
            layer_trf, issue = _checked_trf(trfs.get(name, {}).get(key), total)
            if issue is not None:
                issues[key] = issue
            per_sample = acc.per_sample.get((name, idx)) if keep_per_sample else None
            by_key[key] = ERFResult(
                name=name,
                heatmap=heat,
                trf=layer_trf,
                mode=mode,
                num_samples=n,
                output_shape=grid,
                centre_pixel=_round_centre(centre, spatial, wrapped),
                per_sample=torch.cat(per_sample) if per_sample else None,
                num_calls=acc.calls[name],
                centre=centre,
                trf_issue=issue,
                position=key,
                output_index=idx,
                wrapped=tuple(wrapped),
            )
        _warn_layer(name, zero, issues, estimated, keyed, req, name in acc.detached)
        primary = by_key[req.primary.key]
        if req.is_set:
            from erf_monitor.measure.result import ERFField

            primary.field = ERFField(by_key, grid=req.grid)
        results[name] = primary
    # Layers whose TRF the map contradicts were just warned about: that is why.
    fell_back = [
        n for n in dict.fromkeys(fell_back) if n not in rejected and not _contradicted(results[n])
    ]
    if fell_back:
        warnings.warn(
            f"erf-monitor: cropping to the TRF did not reproduce layer(s) {sorted(set(fell_back))} "
            "exactly (the cropped output lacked the seed unit or its gradient reached the "
            "crop border); "
            "they were probed on the full input. Please report this with the model.",
            ERFProbeWarning,
            stacklevel=3,
        )
    return ERFResults(results)


def _keys_of(req: PositionRequest, have: Mapping[str, TRF]) -> list[str]:
    """The probed position keys of a layer whose grid a TRF tells (``[]`` without one)."""
    t = next(iter(have.values()), None)
    if t is None:
        return []
    return list(req.indices(tuple(t.output_shape), "luo", t.tokens))


def _contradicted(r: ERFResult) -> bool:
    results = r.field.values() if r.field is not None else [r]
    return any(x.trf_issue is not None for x in results)


def _warn_layer(
    name: str,
    zero: list[str],
    issues: Mapping[str, str],
    estimated: list[str],
    keyed: Mapping[str, Index],
    req: PositionRequest,
    detached: bool = False,
) -> None:
    """One warning per layer and kind, naming the positions (none for the centre alone)."""

    def where(keys: Sequence[str]) -> str:
        return "" if req.is_default else f" (position(s) {', '.join(keys)})"

    if zero:
        why = (
            "autograd finds no path from it to the input: torch.no_grad() or .detach() in "
            "the forward, or a layer that does not depend on the input"
            if detached
            else "dead ReLUs, or a layer that does not depend on the input"
        )
        warnings.warn(
            f"Layer {name!r}: the ERF gradient is zero everywhere{where(zero)} ({why}); its "
            "map is all zeros.",
            ERFProbeWarning,
            stacklevel=4,
        )
    if issues:
        first = next(iter(issues.values()))
        warnings.warn(
            f"Layer {name!r}: {first}{where(list(issues))} (no ERF/TRF ratio). Please report "
            "this with the model.",
            ERFProbeWarning,
            stacklevel=4,
        )
    if name in estimated:
        units = sorted(set(keyed.values()))
        shown = str(units[0]) if len(units) == 1 else f"{len(units)} seed units"
        warnings.warn(
            f"Layer {name!r}: the layer geometry could not be analysed, so the theoretical "
            f"centre of its seed unit {shown} is estimated as (i + 0.5) * S / S' - 0.5; "
            "mass squares and the centroid offset are measured around that estimate.",
            ERFProbeWarning,
            stacklevel=4,
        )


def _unit_centre(
    geometry: TRF | None,
    grid: tuple[int, ...],
    index: tuple[int, ...],
    spatial: tuple[int, ...],
) -> tuple[tuple[float, ...], bool]:
    """The seed unit's theoretical centre in input pixels, from the layer geometry, and
    whether it had to be estimated.

    Only when the geometry could not be analysed at all is the proportional estimate used
    (warned about by the caller: a number that may be off by the padding of a few layers).
    """
    if (
        geometry is not None
        and tuple(geometry.output_shape) == grid
        and tuple(geometry.output_centre) == index
        and tuple(geometry.input_shape) == spatial
    ):
        return tuple(float(c) for c in geometry.centre), False
    return proportional_centre(index, grid, spatial), bool(grid)


def _checked_trf(trf: TRF | None, total: torch.Tensor) -> tuple[TRF | None, str | None]:
    """The consistency check: a finite TRF that the map has mass outside of is wrong."""
    if trf is None or trf.is_global or tuple(trf.input_shape) != tuple(total.shape):
        return trf, None
    spill = mass_outside(total, trf)
    if spill == 0.0:
        return trf, None
    issue = (
        f"{spill:.3g} of the ERF mass lies outside the clipped TRF {trf.clipped} ({trf}): the "
        "TRF analysis is wrong for this layer, so its TRF is reported unknown"
    )
    return None, issue


def timed_compute_erf(*args: Any, **kwargs: Any) -> tuple[ERFResults, float]:
    """:func:`compute_erf` plus its wall time in seconds (CUDA synchronised when used)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    res = compute_erf(*args, **kwargs)
    sync()
    return res, time.perf_counter() - t0
