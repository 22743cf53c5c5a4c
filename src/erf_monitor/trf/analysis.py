"""Theoretical receptive fields (TRF) of layers: analytic (torch.fx) with a numeric fallback.

Definitions (DESIGN.md §2): for each layer, its output ``(N, C, *S')`` from the *first* call of
the module; the centre unit ``c' = S'_d // 2`` per spatial dim; the TRF is the input region that
unit can see, per spatial dim, unclipped (infinite input plane) and clipped (exact hull of the
in-bounds input indices that can influence it). Branches are united; global ops make a dim
global. Ops that sample the input at positions computed from the input (deformable
convolution, ``grid_sample`` with a predicted grid, RoI pooling of predicted boxes, gathers
with computed indices) make the field *data-dependent*: no finite field, reported like a
global one with the reason (fx rules, and an op-by-op dependence tracker in the numeric
method).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from fractions import Fraction
from typing import Any, Literal

import numpy as np
from torch import nn

from erf_monitor.core.errors import ERFProbeWarning
from erf_monitor.core.hints import check_not_meta
from erf_monitor.core.index import ModelIndex, index_of, model_index
from erf_monitor.core.modes import check_mode, seed_index
from erf_monitor.core.rng import preserved_rng
from erf_monitor.targets.layers import Located, locate_layer, module_table, unwrap_model
from erf_monitor.targets.observe import ForwardFn, not_reached_error
from erf_monitor.targets.tokens import TokenLayout, layouts_for, resolve_layout
from erf_monitor.trf.fx import (
    Axis,
    Region,
    TracedModel,
    Unrolled,
    Unsupported,
    full_axis,
    full_trace,
    point_axis,
    select_node,
    shape_of,
    trace_model,
    walk,
)
from erf_monitor.trf.numeric import UnitsFn, data_dependent_trf, global_centre, hull, numeric_trfs
from erf_monitor.trf.types import TRF

__all__ = ["theoretical_rfs", "trace_layers", "traced_shape"]

log = logging.getLogger("erf_monitor")

_SPATIAL_MODULES = (
    nn.modules.conv._ConvNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
)


def theoretical_rfs(
    model: nn.Module,
    input_shape: Sequence[int],
    layers: Sequence[str] | Sequence[Located] | str,
    positions: Any = None,
    *,
    method: Literal["auto", "fx", "numeric"] = "auto",
    forward_fn: ForwardFn | None = None,
    token_layout: TokenLayout | Mapping[str, TokenLayout] | None = None,
    mode: str = "luo",
    traced: TracedModel | Unsupported | None = None,
    table: dict[str, nn.Module] | None = None,
    index: ModelIndex | None = None,
    _stacklevel: int = 2,
) -> dict[str, dict[str, TRF]]:
    """:func:`~erf_monitor.theoretical_rf` of several units per layer: ``{layer: {position
    key: TRF}}`` (the analysis behind it; its docstring describes the methods).

    ``layers``: names, or layers located already
    (:func:`~erf_monitor.targets.layers.locate_layers`, or the plan's targets): names are
    looked up once here, located layers never again.
    ``positions`` is a :class:`~erf_monitor.targets.positions.PositionRequest` (every probed
    position of it, the centre included for sets) or ``None`` (the centre unit only, key
    ``"centre"``). One trace serves every unit; each TRF's ``output_centre`` is its unit.
    ``traced``: the model's trace (:func:`trace_layers`) when the caller made it already
    (or why it failed: the analysis then goes on as if it had failed here). ``table``: the
    model's :func:`~erf_monitor.targets.layers.module_table` and ``index`` the unwrapped
    model's :func:`~erf_monitor.core.index.model_index`, when the caller built them already.
    """
    from erf_monitor.targets.positions import PositionRequest

    if method not in ("auto", "fx", "numeric"):
        raise ValueError(f"method must be 'auto', 'fx' or 'numeric', got {method!r}")
    check_mode(mode)
    net = unwrap_model(model)
    if index is None or index.model is not net:
        index = model_index(net)
    check_not_meta(index)
    channels, spatial = parse_input_shape(index, input_shape)
    if table is None:
        table = module_table(index)
    located = _check_layers(model, layers, table)
    req = positions if isinstance(positions, PositionRequest) else None

    def units(name: str, grid: tuple[int, ...], tokens: bool) -> dict[str, tuple[int, ...]]:
        if req is None:
            return {"centre": seed_index(mode, grid, tokens)}
        return req.indices(grid, mode, tokens, name)

    with preserved_rng(), eager_forwards(index):
        if method == "numeric":
            return numeric_trfs(
                net, channels, spatial, located, forward_fn, token_layout, mode, units
            )
        if method == "fx" and isinstance(traced, Unrolled):
            traced = None  # the caller's trace stopped at a loop: "fx" traces all of it
        try:
            with full_trace() if method == "fx" else contextlib.nullcontext():
                return _analytic(
                    net, channels, spatial, located, forward_fn, token_layout, mode, units, traced,
                    table, index,
                )  # fmt: skip
        except Unrolled as exc:  # ("auto")
            return _before_loop(
                exc, net, channels, spatial, located, forward_fn, token_layout, mode, units, table,
                index, _stacklevel + 1,
            )  # fmt: skip
        except Unsupported as exc:
            if method == "fx":
                raise ValueError(
                    f"The torch.fx receptive-field analysis cannot follow this model: {exc}. "
                    "Use method='numeric' (or 'auto')."
                ) from None
            out = numeric_trfs(
                net, channels, spatial, located, forward_fn, token_layout, mode, units
            )
            doubt = numeric_doubt(out)
            if doubt:
                warnings.warn(
                    f"theoretical_rf: falling back to the numeric method ({exc}); {doubt}.",
                    ERFProbeWarning,
                    stacklevel=_stacklevel,
                )
            else:
                log.info(
                    "theoretical_rf: measured with the numeric method (%s); every field lies "
                    "inside the input, where that method is exact.",
                    exc,
                )
            return out


def numeric_doubt(trfs: Mapping[str, Mapping[str, TRF]]) -> str:
    """Why the numeric method's TRFs cannot be vouched for ("" when they can).

    The numeric method sees a field only inside the input. A field strictly inside it (not
    touching the first or last index of any dim) is measured exactly: its interval, size and
    clipped hull are those of the gradient support. A field that reaches the border may go on
    beyond it (unclipped size and interval unknown, reported as clipped), and one that covers
    the whole input is called global by a heuristic (a finite field more than about twice
    the input looks the same). Outputs without spatial dims are global by definition, and a
    data-dependent field is reported as such with its reason: both are certain.
    """
    for name, units in trfs.items():
        for trf in units.values():
            if trf.data_dependent or not trf.output_shape:
                continue
            for (lo, hi), n, glob in zip(trf.clipped, trf.input_shape, trf.global_dims):
                if glob:
                    return (
                        f"layer {name!r} sees the whole input, which that method cannot tell "
                        "from a finite field larger than the input"
                    )
                if lo <= 0 or hi >= n - 1:
                    return (
                        f"layer {name!r}'s field reaches the input's border, beyond which that "
                        "method cannot see (its size and interval are reported clipped)"
                    )
    return ""


def _before_loop(
    exc: Unrolled,
    net: nn.Module,
    channels: int,
    spatial: tuple[int, ...],
    located: list[Located],
    forward_fn: ForwardFn | None,
    token_layout: TokenLayout | Mapping[str, TokenLayout] | None,
    mode: str,
    units: UnitsFn,
    table: dict[str, nn.Module] | None,
    index: ModelIndex | None,
    stacklevel: int,
) -> dict[str, dict[str, TRF]]:
    """The fx TRFs of the layers that the trace reached before it stopped at a loop; the
    others are unknown (left out, as ``trf="skip"`` leaves every layer), said in one line."""
    out: dict[str, dict[str, TRF]] = {}
    for layer in located:
        if layer.path in exc.traced.outputs:
            with contextlib.suppress(Unsupported):
                out.update(_analytic(net, channels, spatial, [layer], forward_fn, token_layout,
                                     mode, units, exc.traced, table, index))  # fmt: skip
    unknown = [layer.spec for layer in located if layer.spec not in out]
    if unknown:
        warnings.warn(
            f"theoretical_rf: {exc}; no TRF for {unknown} (as with trf='skip'). "
            "theoretical_rf(..., method='fx') traces the whole loop, method='numeric' measures "
            "it (both slower); compute_erf takes either result as trf=.",
            ERFProbeWarning,
            stacklevel=stacklevel,
        )
    return out


# ----------------------------------------------------------------------------- arguments


@contextlib.contextmanager
def eager_forwards(model: nn.Module | ModelIndex) -> Iterator[None]:
    """Run the eager ``forward`` of modules whose instance ``forward`` was compiled.

    ``Trainer.fit(torch.compile(module))`` unwraps the module and replaces its ``forward`` by
    a dynamo-compiled one (an instance attribute). Neither the fx trace nor the numeric
    surrogate (a copy of the module) can run that: for the analysis the compiled attribute
    is taken away (the class's own ``forward`` is the same function, eagerly), and put back
    afterwards. ``model`` may be the model's index.
    """
    swapped: list[tuple[nn.Module, Any]] = []
    for m in index_of(model).modules:
        compiled = m.__dict__.get("forward")
        orig = getattr(compiled, "_torchdynamo_orig_callable", None)
        if compiled is None or orig is None:
            continue
        swapped.append((m, compiled))
        if getattr(orig, "__self__", None) is m and getattr(orig, "__func__", None) is getattr(
            type(m), "forward", None
        ):
            del m.__dict__["forward"]
        else:
            m.__dict__["forward"] = orig
    try:
        yield
    finally:
        for m, compiled in swapped:
            m.__dict__["forward"] = compiled


def parse_input_shape(
    net: nn.Module | ModelIndex, input_shape: Sequence[int]
) -> tuple[int, tuple[int, ...]]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise TypeError(f"input_shape must be a sequence of ints, got {input_shape!r}") from None
    first = next((m for m in index_of(net).modules if isinstance(m, _SPATIAL_MODULES)), None)
    nd: int | None = None
    if isinstance(first, nn.modules.conv._ConvNd):
        nd = len(first.kernel_size)
    elif first is not None:
        nd = {"1d": 1, "2d": 2, "3d": 3}.get(type(first).__name__[-2:].lower())
    if nd is not None and len(shape) == nd + 2:
        shape = shape[1:]  # (N, C, *S)
    elif nd is None and len(shape) == 5:
        shape = shape[1:]
    if len(shape) < 2:
        raise ValueError(
            f"input_shape {tuple(input_shape)} has no spatial dims: pass (C, *S) or (N, C, *S) "
            "with 1 to 3 spatial dims."
        )
    if len(shape) > 4:
        raise ValueError(f"input_shape {tuple(input_shape)}: at most 3 spatial dims supported.")
    if any(s <= 0 for s in shape):
        raise ValueError(f"input_shape {tuple(input_shape)} has a non-positive size.")
    return shape[0], shape[1:]


def _check_layers(
    net: nn.Module,
    layers: Sequence[str] | Sequence[Located] | str,
    table: dict[str, nn.Module] | None = None,
) -> list[Located]:
    """``layers`` located, each name looked up once (located layers as they are)."""
    specs = [layers] if isinstance(layers, str) else list(layers)
    if not specs:
        raise ValueError("No layers given: pass at least one layer name.")
    out: list[Located] = []
    if table is None:
        table = module_table(unwrap_model(net))
    for spec in specs:
        if isinstance(spec, Located):
            out.append(spec)
            continue
        if not isinstance(spec, str):
            raise TypeError(f"Layer names must be strings, got {type(spec).__name__}: {spec!r}")
        # raises for unknown names, listing close matches
        out.append(Located(spec, *locate_layer(net, spec, table)))
    return out


# ----------------------------------------------------------------------------- assembly


def _analytic(
    net: nn.Module,
    channels: int,
    spatial: tuple[int, ...],
    located: list[Located],
    forward_fn: ForwardFn | None,
    token_layout: TokenLayout | Mapping[str, TokenLayout] | None = None,
    mode: str = "luo",
    units: UnitsFn | None = None,
    traced: TracedModel | Unsupported | None = None,
    table: dict[str, nn.Module] | None = None,
    index: ModelIndex | None = None,
) -> dict[str, dict[str, TRF]]:
    if isinstance(traced, Unsupported):
        raise traced  # the caller's trace failed already: not twice
    if table is None:
        table = module_table(net if index is None else index)
    if traced is None:
        traced = trace_layers(net, (channels, *spatial), located, forward_fn, table, index)
    layouts = layouts_for(token_layout, [t.spec for t in located])
    return {
        t.spec: _analytic_units(traced, t, spatial, layouts.get(t.spec), net, mode, units, table)
        for t in located
    }


def trace_layers(
    net: nn.Module,
    input_shape: Sequence[int],
    names: Sequence[str] | Sequence[Located],
    forward_fn: ForwardFn | None = None,
    table: dict[str, nn.Module] | None = None,
    index: ModelIndex | None = None,
) -> TracedModel:
    """The fx trace the analysis walks, up to the last of the layers ``names`` (specs, or
    located layers: not looked up again; ``table``, ``index``: ``net``'s module table and
    index, when the caller built them already).

    Raises:
        Unsupported: the model cannot be traced.
    """
    if index is None or index.model is not net:
        index = model_index(net)
    if table is None:
        table = module_table(index)
    modules = {t.path if isinstance(t, Located) else locate_layer(net, t, table)[0] for t in names}
    with preserved_rng(), eager_forwards(index):
        return trace_model(net, forward_fn, tuple(input_shape), stop_after=modules, index=index)


def traced_shape(
    traced: TracedModel,
    net: nn.Module,
    layer: str | Located,
    table: dict[str, nn.Module] | None = None,
) -> tuple[int, ...] | None:
    """The shape (batch 1) of ``layer``'s selected output in a trace (``None``: not a
    single floating-point tensor there, or not reached: the targets stage then reads the
    output itself, and says what is wrong with it). ``layer``: a spec, or located already."""
    loc = layer if isinstance(layer, Located) else Located(layer, *locate_layer(net, layer, table))
    name, key, selector = loc.spec, loc.path, loc.selector
    if traced.outputs.get(key) is None and not selector:
        return None
    try:
        node = select_node(traced, key, selector, name)
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    meta = getattr(node, "meta", {}).get("tensor_meta")
    if not getattr(getattr(meta, "dtype", None), "is_floating_point", False):
        return None
    return shape_of(node)


def _analytic_units(
    traced: TracedModel,
    layer: str | Located,
    spatial: tuple[int, ...],
    layout: TokenLayout | None = None,
    net: nn.Module | None = None,
    mode: str = "luo",
    units: UnitsFn | None = None,
    table: dict[str, nn.Module] | None = None,
) -> dict[str, TRF]:
    """The TRF of each unit ``units`` names (default: the mode's centre unit), one walk each."""
    if isinstance(layer, Located):
        name, key, selector = layer.spec, layer.path, layer.selector
    elif net is not None:
        name, (key, _module, selector) = layer, locate_layer(net, layer, table)
    else:
        name, key, selector = layer, layer, ()
    if key not in traced.outputs:
        parts = key.split(".")
        if any(".".join(parts[:i]) in traced.leaf_paths for i in range(1, len(parts))):
            raise Unsupported(f"layer {name!r} lives inside a module fx treats as one op")
        raise not_reached_error([name])
    node = select_node(traced, key, selector, name)
    out_shape = shape_of(node)
    if node is None or out_shape is None:
        raise Unsupported(f"layer {name!r} does not return a single tensor")
    nd = len(spatial)
    conv_like = len(out_shape) == nd + 2
    tokens = resolve_layout(name, tuple(out_shape), layout, spatial, net)
    if tokens is not None:
        out_spatial = tokens.grid
    elif conv_like:
        out_spatial = tuple(out_shape[2:])
    else:
        out_spatial = ()
    wanted = (
        units(name, out_spatial, tokens is not None)
        if units is not None
        else {"centre": seed_index(mode, out_spatial, tokens=tokens is not None)}
    )
    done: dict[tuple[int, ...], TRF] = {}
    for centre_idx in wanted.values():
        if centre_idx in done:
            continue
        if tokens is not None:
            # Token output: seed the patch token (all features), on the patch grid.
            points = [point_axis(n, c) for n, c in zip(out_spatial, centre_idx)]
            if tokens.channels_last:
                seed_axes = [point_axis(out_shape[0], 0), *points, full_axis(out_shape[-1])]
            else:
                flat = tokens.prefix_tokens + int(np.ravel_multi_index(centre_idx, out_spatial))
                seed_axes = [point_axis(out_shape[0], 0), point_axis(out_shape[1], flat)]
                seed_axes.append(full_axis(out_shape[2]))
        elif conv_like:
            seed_axes = [point_axis(out_shape[0], 0), full_axis(out_shape[1])]
            seed_axes += [point_axis(n, c) for n, c in zip(out_spatial, centre_idx)]
        else:
            seed_axes = [point_axis(out_shape[0], 0)] + [full_axis(n) for n in out_shape[1:]]
        region = walk(traced, node, Region(seed_axes))
        if region is None:
            raise Unsupported(f"layer {name!r} does not depend on the input in the traced graph")
        if len(region.axes) != nd + 2:
            raise Unsupported("the input region has an unexpected rank")
        if region.data_dependent:
            trf = data_dependent_trf(spatial, out_spatial, centre_idx, region.data_dependent, "fx")
        else:
            pitch = tokens.patch if tokens is not None else None
            trf = _assemble(region.axes[2:], region.local, spatial, out_spatial, centre_idx, pitch)
        done[centre_idx] = replace(trf, tokens=tokens is not None, masked=region.masked)
    return {k: done[idx] for k, idx in wanted.items()}


def _assemble(
    axes: list[Axis],
    local: bool,
    spatial: tuple[int, ...],
    out_spatial: tuple[int, ...],
    centre_idx: tuple[int, ...],
    pitch: tuple[int, ...] | None = None,
) -> TRF:
    """The TRF of the walk's input ``axes``. A dim whose walk lost the step between units
    (through a token sequence's flattening) takes the patch size ``pitch`` where it is known
    (a patch grid need not cover the input: 14 px patches leave 12 of 96 px out), else
    ``S / S'``."""
    size: list[float] = []
    stride: list[float] = []
    interval: list[tuple[float, float]] = []
    clipped: list[tuple[int, int]] = []
    glob: list[bool] = []
    centre: list[float] = []
    for d, ax in enumerate(axes):
        s_out = out_spatial[d] if out_spatial else 1
        c = centre_idx[d] if centre_idx else 0
        is_global = ax.mixed or not out_spatial
        glob.append(is_global)
        clipped.append(hull(ax.mask))
        step = Fraction(spatial[d], s_out) if pitch is None else Fraction(pitch[d])
        jump = ax.jump if ax.jump is not None else step
        stride.append(float(jump))
        if is_global or ax.lo is None or ax.hi is None:
            size.append(math.inf)
            interval.append((-math.inf, math.inf))
            # (with a pitch: the centre of the unit's own patch, (c + 1/2) pitch - 1/2)
            s_in = spatial[d] if pitch is None else pitch[d] * s_out
            centre.append(global_centre(c, s_in, s_out))
        else:
            size.append(float(ax.hi - ax.lo + 1))
            interval.append((ax.lo, ax.hi))
            centre.append((ax.lo + ax.hi) / 2)
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
        method="fx",
        local=bool(local and not any(glob) and out_spatial),
        wrapped=tuple(bool(ax.wrap) and not g for ax, g in zip(axes, glob)),
    )


# ----------------------------------------------------------------------------- numeric
