"""The probe plan: what a probe needs that depends only on the model's structure, the input
shape and the arguments — built once, reused by every probe.

:func:`build_plan` runs the pipeline's first stages in order: *targets* (layer specs as spelled,
modules, output selectors, layouts: :func:`~erf_monitor.targets.resolve.resolve_targets`, the
one resolver of named and ``"auto"`` layers; each spec is looked up once,
:func:`~erf_monitor.targets.layers.locate_layers`, and the trace, the targets and the TRF
analysis all read what it found), *TRFs* (the analysis, TRFs given by the caller,
or none; the seed units' geometry in every case), the *seed units* of every position, the
*crop groups* and the probe *dtype*. :func:`compute_erf`, :func:`theoretical_rf`, the monitors
and the command line all build it the same way; the monitors build it once at setup.

``compute_erf`` keeps the plans it built (a few per model, dropped with the model) keyed by
the model's structure — every module's type, configuration (``extra_repr``) and parameter
shapes — the input shape, device and the arguments: a second call on the same model and
input shape pays no analysis again. A plan never holds the model's weights' values: maps are
always computed from the weights as they are.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from erf_monitor.core.buffers import preserved_buffers, preserved_training
from erf_monitor.core.devices import model_device_dtype
from erf_monitor.core.errors import ERFProbeWarning
from erf_monitor.core.index import ModelIndex, index_of, model_index
from erf_monitor.core.modes import Mode, seed_index
from erf_monitor.core.rng import preserved_rng
from erf_monitor.probe.crop import CropOption, Group, Index, plan_groups
from erf_monitor.targets.layers import Located, locate_layers, module_table, unwrap_model
from erf_monitor.targets.observe import ForwardFn
from erf_monitor.targets.positions import PositionRequest, PositionSpec, request
from erf_monitor.targets.resolve import Target, resolve_targets
from erf_monitor.targets.small import check_grids
from erf_monitor.targets.tokens import TokenLayout, TokenLayoutArg
from erf_monitor.trf.types import TRF

__all__ = [
    "GivenTRF",
    "ProbePlan",
    "build_plan",
    "cached_plan",
    "probe_dtype",
    "probe_state",
]

#: What ``trf=`` may hold per layer: one TRF, several (one per seed unit), or none.
GivenTRF = TRF | Sequence[TRF] | Mapping[Any, TRF] | None
#: ``"auto"``/``"fx"``/``"numeric"``: analyse with that method; ``"skip"``; or given TRFs.
TRFOption = Mapping[str, GivenTRF] | Literal["auto", "fx", "numeric", "skip"]

#: How many plans were built in this process (tests count them).
builds = 0

#: Modules whose train-mode forward mixes the samples of a batch through batch statistics.
_BATCH_COUPLED: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)


@dataclass
class ProbePlan:
    """Everything a probe needs besides the weights and the images (see the module docstring).

    Attributes:
        targets: the probed layers, resolved, in the order asked for.
        input_shape: ``(C, *S)`` the plan was built for.
        mode: the ERF convention.
        request: the seed positions.
        units: ``{layer: {position key: output index}}``.
        trfs: ``{layer: {position key: TRF}}`` of the analysis or given (empty if skipped).
        geometry: the TRFs that place every seed unit's theoretical centre.
        groups: which units run on which input window (:mod:`erf_monitor.probe.crop`).
        dtype: the probe's floating-point dtype.
        trf_error: why the TRF analysis failed (when the builder was asked not to raise).
    """

    targets: tuple[Target, ...]
    input_shape: tuple[int, ...]
    mode: Mode
    request: PositionRequest
    units: dict[str, dict[str, Index]]
    trfs: dict[str, dict[str, TRF]]
    geometry: dict[str, dict[str, TRF]]
    groups: list[Group]
    dtype: torch.dtype
    forward_fn: ForwardFn | None = None
    train_mode: bool = False
    crop: CropOption = "auto"
    trf_error: str | None = None
    #: ``{layer: {output index: TRF}}``: the TRF of each seed unit (for cropping and packing).
    unit_trfs: dict[str, dict[Index, TRF]] = field(default_factory=dict)
    #: The (unwrapped) model the plan was built for, weakly: its targets are that model's.
    model: weakref.ref[nn.Module] | None = None
    #: The model pads from its input's size: crops keep that size modulo the stride.
    sized_padding: bool = False

    def built_for(self, model: nn.Module) -> bool:
        """Whether the plan's targets are modules of ``model`` (another instance needs its
        own plan, even with the same structure)."""
        return self.model is not None and self.model() is unwrap_model(model)

    @property
    def names(self) -> list[str]:
        return [t.spec for t in self.targets]

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.input_shape[1:])

    @property
    def layouts(self) -> dict[str, TokenLayout]:
        """``{layer: TokenLayout}`` of the layers read through a layout (explicit)."""
        return {t.spec: t.token_layout for t in self.targets if t.token_layout is not None}

    def target(self, spec: str) -> Target:
        return next(t for t in self.targets if t.spec == spec)

    def distrust(self, name: str) -> None:
        """Stop trusting ``name``'s TRFs for cropping and packing (a map contradicted them);
        they stay reported, and the consistency check keeps rejecting them."""
        self.trfs[name] = {k: replace(t, local=False) for k, t in self.trfs.get(name, {}).items()}
        self.unit_trfs[name] = {tuple(t.output_centre): t for t in self.trfs[name].values()}
        seeds = {n: list(dict.fromkeys(self.units[n].values())) for n in self.names}
        self.groups = plan_groups(seeds, self.unit_trfs, self.spatial, self.crop, self.train_mode,
                                  self.sized_padding)  # fmt: skip

    def primary_trfs(self) -> dict[str, TRF | None]:
        """``{layer: TRF of its primary seed unit}`` (``None`` where unknown)."""
        key = self.request.primary.key
        return {name: self.trfs.get(name, {}).get(key) for name in self.names}


def probe_dtype(requested: torch.dtype | None, param_dtype: torch.dtype) -> torch.dtype:
    """The probe's dtype: the one asked for, else the parameters' (float64 models included),
    float32 for half-precision models (probed with float32 copies of their weights: half
    arithmetic leaves maps several percent off) and for models without floating parameters."""
    if requested is not None:
        return requested
    if param_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return param_dtype if param_dtype.is_floating_point else torch.float32


def pads_from_size(net: nn.Module | ModelIndex) -> bool:
    """Whether ``net`` has modules that pad from their input's size, TensorFlow's "SAME" way
    (timm's ``Conv2dSame``, ``MaxPool2dSame``, ``AvgPool2dSame``; the traced graph holds
    their paddings as numbers, so the analysis cannot tell)."""
    return any(type(m).__name__.endswith("Same") for m in index_of(net).modules)


@contextlib.contextmanager
def probe_state(
    model: nn.Module, train_mode: bool, device: torch.device, index: ModelIndex | None = None
) -> Iterator[None]:
    """Put the model in the probe's mode and restore *everything* it may touch afterwards:
    every module's ``training`` flag, every buffer, every random stream; autocast off,
    gradients on (also inside ``no_grad``/``inference_mode``), compiled submodules eager.
    ``index``: the model's index, when the caller took it already."""
    index = index_of(model) if index is None else index
    with contextlib.ExitStack() as stack:
        # BatchNorm statistics in train mode, quantization observers and counters in any mode
        stack.enter_context(preserved_buffers(index))
        stack.enter_context(preserved_rng(device))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for dev_type in {"cpu", device.type}:
            if dev_type in ("cpu", "cuda"):
                stack.enter_context(torch.autocast(device_type=dev_type, enabled=False))
        stance = getattr(torch.compiler, "set_stance", None)
        if stance is not None:  # torch >= 2.6: compiled submodules run eagerly, no recompiles
            stack.enter_context(stance("force_eager"))
        stack.enter_context(preserved_training(index))
        model.train(train_mode)
        yield


def build_plan(
    model: nn.Module,
    example: torch.Tensor,
    layers: str | Sequence[str],
    *,
    mode: Mode = "luo",
    position: PositionSpec = "centre",
    token_layout: TokenLayoutArg = None,
    forward_fn: ForwardFn | None = None,
    trf: TRFOption = "auto",
    crop: CropOption = "auto",
    train_mode: bool = False,
    raise_trf_errors: bool = True,
    index: ModelIndex | None = None,
) -> ProbePlan:
    """Build the plan of a probe of ``layers`` on inputs shaped like ``example``.

    ``example`` is a batch ``(N, C, *S)`` on the model's device in the probe dtype; its first
    samples are run through the model (no gradients) to read the layers' outputs.
    ``raise_trf_errors=False`` records a failed TRF analysis in ``plan.trf_error`` (the probe
    then runs on the full input, metrics still centred from the geometry) instead of raising.
    ``index``: the (unwrapped) model's :func:`~erf_monitor.core.index.model_index`, when the
    caller took it already: every stage reads it instead of walking the model again.
    """
    global builds
    builds += 1
    net = unwrap_model(model)
    if index is None or index.model is not net:
        index = model_index(net)
    req = request(position, example.dim() - 2)
    with probe_state(net, False, example.device, index):  # nothing built may change the model
        return _build(
            model, net, example, layers, req, mode, token_layout, forward_fn, trf, crop,
            train_mode, raise_trf_errors, index,
        )  # fmt: skip


def _build(
    model: nn.Module,
    net: nn.Module,
    example: torch.Tensor,
    layers: str | Sequence[str],
    req: PositionRequest,
    mode: Mode,
    token_layout: TokenLayoutArg,
    forward_fn: ForwardFn | None,
    trf: TRFOption,
    crop: CropOption,
    train_mode: bool,
    raise_trf_errors: bool,
    index: ModelIndex,
) -> ProbePlan:
    spatial = tuple(example.shape[2:])
    input_shape = tuple(example.shape[1:])
    # The fx analysis (or, skipped, the geometry that places the seed units) walks a trace.
    traces = isinstance(trf, str) and trf in ("auto", "fx", "skip")
    traced = None
    known: dict[str, tuple[int, ...]] = {}
    table = module_table(index)  # one name table serves every stage below
    auto = isinstance(layers, str) and layers == "auto"
    # Each named spec is looked up once, here: every stage below reads the located layers
    # (the wrapped model: messages name it). "auto" locates its picks in the targets stage.
    named: str | list[Located] = "auto" if auto else locate_layers(model, layers, table)
    if traces and not isinstance(named, str):
        # Named layers: the trace the analysis walks tells their shapes too (no forward).
        traced, known = _trace_first(net, input_shape, named, forward_fn, table, index)
    # The forward that reads the layers' outputs runs the model as it is: a half model on a
    # half example (only shapes are read; the probe computes in ``example``'s dtype).
    _, native = model_device_dtype(index)
    first = example[:2].detach()
    first = first.to(native) if native in (torch.float16, torch.bfloat16) else first
    targets = tuple(resolve_targets(model, named, first, forward_fn, token_layout, known, table))
    names = [t.spec for t in targets]
    layouts = {t.spec: t.token_layout for t in targets if t.token_layout is not None}
    units = {t.spec: req.indices(t.grid, mode, t.tokens, t.spec) for t in targets}
    trf_error: str | None = None
    trfs: dict[str, dict[str, TRF]]
    if trf == "auto" or trf == "fx" or trf == "numeric":
        try:
            trfs = _analyse(
                net, input_shape, targets, req, forward_fn, layouts, mode, trf, traced, table, index
            )
        except Exception as exc:
            if raise_trf_errors:
                raise
            trf_error = f"{type(exc).__name__}: {exc}"
            trfs = {}
        # A failed analysis is not run again for the geometry (it would fail the same way):
        # the centres are then estimated, with a warning.
        geometry = trfs
    elif isinstance(trf, str):  # "skip"
        trfs = {}
        geometry = _geometry(
            net, input_shape, targets, forward_fn, layouts, mode, req, table, index, traced
        )
    else:
        trfs = _usable_trfs(trf, names, spatial, mode, req)
        geometry = trfs
        incomplete = [t for t in targets if any(k not in trfs[t.spec] for k in units[t.spec])]
        if incomplete:  # positions without a given TRF: centres from the geometry
            more = _geometry(
                net, input_shape, incomplete, forward_fn, layouts, mode, req, table, index
            )
            geometry = {n: {**more.get(n, {}), **trfs[n]} for n in names}
    glob = {n: next(iter(g.values())).global_dims for n, g in geometry.items() if g}
    check_grids(net, targets, example, forward_fn, glob)  # one-unit outputs: warn
    if train_mode and trfs and any(isinstance(m, _BATCH_COUPLED) for m in index.modules):
        trfs = {n: {k: _batch_coupled(t) for k, t in units_.items()} for n, units_ in trfs.items()}
    unit_trfs = {n: {tuple(t.output_centre): t for t in trfs.get(n, {}).values()} for n in names}
    seeds = {n: list(dict.fromkeys(units[n].values())) for n in names}
    sized = pads_from_size(index)
    groups = plan_groups(seeds, unit_trfs, spatial, crop, train_mode, sized)
    return ProbePlan(
        targets=targets,
        input_shape=input_shape,
        mode=mode,
        request=req,
        units=units,
        trfs=trfs,
        geometry=dict(geometry),
        groups=groups,
        dtype=example.dtype,
        forward_fn=forward_fn,
        train_mode=train_mode,
        crop=crop,
        trf_error=trf_error,
        unit_trfs=unit_trfs,
        model=weakref.ref(net),
        sized_padding=sized,
    )


def _analyse(
    net: nn.Module,
    input_shape: tuple[int, ...],
    targets: Sequence[Located],
    req: PositionRequest,
    forward_fn: ForwardFn | None,
    layouts: Mapping[str, TokenLayout],
    mode: Mode,
    method: Literal["auto", "fx", "numeric"] = "auto",
    traced: Any = None,
    table: dict[str, nn.Module] | None = None,
    index: ModelIndex | None = None,
) -> dict[str, dict[str, TRF]]:
    from erf_monitor.trf.analysis import theoretical_rfs

    return theoretical_rfs(
        net, input_shape, list(targets), req, method=method, forward_fn=forward_fn,
        token_layout=layouts, mode=mode, traced=traced, table=table, index=index,
    )  # fmt: skip


def _trace_first(
    net: nn.Module,
    input_shape: tuple[int, ...],
    layers: list[Located],
    forward_fn: ForwardFn | None,
    table: dict[str, nn.Module] | None = None,
    index: ModelIndex | None = None,
) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """The analysis' trace and the located layers' output shapes read from it; ``(None, {})``
    when the trace fails with a ValueError or TypeError (the targets stage then says what is
    wrong), ``(Unsupported, {})`` when the trace cannot follow the model (the analysis falls
    back as it would, without tracing again)."""
    from erf_monitor.trf.analysis import trace_layers, traced_shape
    from erf_monitor.trf.fx import Unsupported

    try:
        traced = trace_layers(net, input_shape, layers, forward_fn, table, index)
    except Unsupported as exc:
        return exc, {}
    except (ValueError, TypeError):
        return None, {}
    shapes = {t.spec: traced_shape(traced, net, t, table) for t in layers}
    return traced, {s: shape for s, shape in shapes.items() if shape is not None}


def _geometry(
    net: nn.Module,
    input_shape: tuple[int, ...],
    targets: Sequence[Located],
    forward_fn: ForwardFn | None,
    layouts: Mapping[str, TokenLayout],
    mode: Mode,
    req: PositionRequest,
    table: dict[str, nn.Module] | None = None,
    index: ModelIndex | None = None,
    traced: Any = None,
) -> dict[str, dict[str, TRF]]:
    """The TRF analysis used only for the seed units' theoretical centres (silent; ``{}`` if
    the model cannot be analysed). ``traced``: the trace the targets stage read, if any."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _analyse(
                net, input_shape, targets, req, forward_fn, layouts, mode,
                traced=traced, table=table, index=index,
            )  # fmt: skip
    except Exception:
        return {}


def _batch_coupled(trf: TRF) -> TRF:
    """The TRF of a unit in train mode behind batch statistics: every pixel (of every sample)
    reaches it through the batch mean and variance, so it is global (centre unchanged)."""
    nd = len(trf.input_shape)
    return replace(
        trf,
        size=(math.inf,) * nd,
        interval=((-math.inf, math.inf),) * nd,
        clipped=tuple((0, s - 1) for s in trf.input_shape),
        global_dims=(True,) * nd,
        local=False,
        wrapped=(),
        reason="train mode: BatchNorm's batch statistics make every input pixel (of every "
        "sample) reach the unit",
    )


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
                    stacklevel=5,
                )
                continue
            for k in keys:
                out[name][k] = t
    return out


# ----------------------------------------------------------------------------- the cache

#: Plans kept per model (the most recently used ones).
_PLANS_PER_MODEL = 8
_cache: weakref.WeakKeyDictionary[nn.Module, OrderedDict[Any, ProbePlan]] = (
    weakref.WeakKeyDictionary()
)


def structure_key(net: nn.Module | ModelIndex) -> tuple[Any, ...]:
    """What a plan depends on in a model: every module's name, type and configuration
    (``extra_repr``: kernel sizes, strides, paddings...) and its parameter shapes (``net`` may
    be the model's index)."""
    return tuple(
        (
            name,
            type(m).__qualname__,
            m.extra_repr(),
            tuple((k, tuple(p.shape)) for k, p in m._parameters.items() if p is not None),
        )
        for name, m in index_of(net).named
    )


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def cached_plan(
    model: nn.Module, example: torch.Tensor, *, index: ModelIndex | None = None, **kwargs: Any
) -> ProbePlan:
    """:func:`build_plan`, or the plan built before for the same model structure, input
    shape, device, dtype and arguments. Not cached: plans with a ``forward_fn`` (a new
    function object may behave differently) or with TRFs given by the caller. ``index``: the
    (unwrapped) model's index, when the caller took it already (the key reads it too)."""
    net = unwrap_model(model)
    if index is None or index.model is not net:
        index = model_index(net)
    trf = kwargs.get("trf", "auto")
    cacheable = kwargs.get("forward_fn") is None and isinstance(trf, str)
    key = None
    if cacheable:
        try:
            key = (
                structure_key(index),
                tuple(example.shape[1:]),
                example.device,
                example.dtype,
                _hashable(kwargs),
            )
            hash(key)
        except TypeError:  # an argument that cannot be a key (e.g. an unhashable layout)
            key = None
    plans = _cache.get(net)
    if key is not None and plans is not None and key in plans:
        plans.move_to_end(key)
        return plans[key]
    plan = build_plan(model, example, index=index, **kwargs)
    if key is not None:
        plans = _cache.setdefault(net, OrderedDict())
        plans[key] = plan
        while len(plans) > _PLANS_PER_MODEL:
            plans.popitem(last=False)
    return plan
