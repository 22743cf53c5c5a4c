"""Analytic theoretical receptive fields: a backward index-set walk over a torch.fx graph.

The model is traced with concrete shapes (:mod:`erf_monitor.trf.tracer`: every module call,
containers included, is recorded by path so that a requested layer's output node is known),
and then, starting from the layer's output node, a *region*
(:mod:`erf_monitor.trf.regions`) is walked backward to the input:

* per tensor axis an unclipped inclusive interval ``[lo, hi]`` (indices as if every plane were
  infinite: padding never clips it), the exact set of in-bounds indices that can influence the
  seed (a boolean mask: the per-axis projection of the influencing set, so hulls of unions
  stay exact), a ``mixed`` flag (a global op needs the whole axis) and the effective stride
  ("jump") accumulated along the path; where axes are tied (a window partition, masked
  attention) the exact set over them (a joint);
* fan-in (residual adds, concatenations, branches) takes the union of the regions.

Each op kind has one rule, registered right above its definition with
:func:`erf_monitor.trf.rules.op_rule` (the tables live in :mod:`erf_monitor.trf.rules`): a rule
maps the region of an op's output to regions of its tensor inputs. An op without a rule raises
:class:`Unsupported` (the caller falls back to the numeric method). To support a new op, write
a rule and decorate it. Attention rules read which weights a constant mask
switches off from :mod:`erf_monitor.trf.masks` (where the ``-100`` decision is documented).
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import replace
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from erf_monitor.core.index import ModelIndex
from erf_monitor.core.shapes import ntuple
from erf_monitor.trf import tracer
from erf_monitor.trf.masks import Masks
from erf_monitor.trf.regions import (
    Axis,
    AxisMap,
    Region,
    broadcast_region,
    carry_joint,
    dense,
    full_axis,
    identity_map,
    joined,
    point_axis,
    reshape_region,
    roll_axis,
    roll_taps,
    table_axis,
    transposed_axis,
    window_axis,
    window_taps,
    with_joint,
)
from erf_monitor.trf.rules import (
    FUNCTION_RULES,
    METHOD_RULES,
    MODULE_RULES,
    NAMED_FUNCTION_RULES,
    op_rule,
    register_function,
    register_module,
    register_named,
)
from erf_monitor.trf.tracer import (
    TracedGraph,
    TracedModel,
    Unrolled,
    Unsupported,
    canonical,
    full_trace,
)

__all__ = [
    "Axis",
    "Region",
    "TracedModel",
    "Unrolled",
    "Unsupported",
    "full_trace",
    "select_node",
    "trace_model",
    "walk",
]

Mask = npt.NDArray[np.bool_]


# ----------------------------------------------------------------------------- tracing


def trace_model(
    model: nn.Module,
    forward_fn: Callable[[nn.Module, torch.Tensor], Any] | None,
    input_shape: Sequence[int],
    stop_after: Collection[str] = (),
    index: ModelIndex | None = None,
) -> TracedModel:
    """Trace ``model`` with concrete shapes (:func:`erf_monitor.trf.tracer.trace_model`, up
    to the modules ``stop_after`` when given); functions with a rule here stay one call."""
    return tracer.trace_model(
        model, forward_fn, input_shape, keep_function=_has_function_rule, stop_after=stop_after,
        index=index,
    )  # fmt: skip


def _has_function_rule(fn: Any) -> bool:
    try:
        if fn in FUNCTION_RULES:
            return True
    except TypeError:
        return False
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', '')}" in NAMED_FUNCTION_RULES


# ----------------------------------------------------------------------------- walk


def shape_of(node: Any) -> tuple[int, ...] | None:
    """Shape of a node's tensor output, or None if it is not a single tensor."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return tuple(int(s) for s in meta.shape)
    return None


class _Ctx:
    def __init__(self, traced: TracedModel) -> None:
        self.traced = traced
        self.gm = traced.gm
        self.data_dependent: list[str] = []  # ops on the way that sample data-dependently
        self.masked = False  # a constant mask switched attention weights off on the way
        self._values: dict[fx.Node, bool] = {}
        self.masks: Masks = traced.memo.setdefault("masks", Masks(traced))

    def depends_on_values(self, n: Any) -> bool:
        """Whether node ``n`` is a tensor computed from the input's *values*: shapes read off
        the input (``x.shape[0]`` in an ``expand``) do not count."""
        if not isinstance(n, fx.Node) or n not in self.traced.dependent:
            return False
        if n is self.traced.placeholder:
            return True
        if n not in self._values:
            self._values[n] = shape_of(n) is not None and any(
                self.depends_on_values(a) for a in n.all_input_nodes
            )
        return self._values[n]

    def is_tensor_input(self, n: Any) -> bool:
        return isinstance(n, fx.Node) and n in self.traced.dependent and shape_of(n) is not None

    def shape(self, n: fx.Node) -> tuple[int, ...]:
        s = shape_of(n)
        if s is None:
            raise Unsupported(f"no tensor shape for {n.format_node()}")
        return s


Contribution = tuple[fx.Node, Region]
Rule = Callable[[_Ctx, fx.Node, Region], list[Contribution]]


def walk(traced: TracedModel, target: fx.Node, seed: Region) -> Region | None:
    """Walk ``seed`` (a region of ``target``'s output) back to the input placeholder.

    Returns the region of the input, or None if the target does not depend on the input.
    """
    ctx = _Ctx(traced)
    regions: dict[fx.Node, Region] = {target: seed}
    result: Region | None = None
    for node in reversed(traced.gm.graph.nodes):
        reg = regions.pop(node, None)
        if reg is None or node not in traced.dependent:
            continue
        if node is traced.placeholder:
            result = reg
            continue
        for inp, r in apply_rule(ctx, node, reg):
            if inp not in traced.dependent:
                continue
            prev = regions.get(inp)
            regions[inp] = r if prev is None else prev.union(r)
    if result is not None and ctx.data_dependent:
        result.data_dependent = ctx.data_dependent[0]
    if result is not None:
        result.masked = ctx.masked
    return result


def describe(node: fx.Node, gm: TracedGraph | None = None) -> str:
    """A short name for an op (for messages)."""
    if node.op == "call_module" and gm is not None:
        cls = type(gm.get_submodule(str(node.target)))
        return f"module {cls.__module__}.{cls.__qualname__} ({canonical(str(node.target))})"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    where = getattr(target, "__module__", None)
    return f"{where}.{name}" if where else str(name)


def apply_rule(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    """Map the region of ``node``'s output onto its tensor inputs."""
    rule: Rule | None = None
    if node.op == "call_module":
        mod = ctx.gm.get_submodule(str(node.target))
        for cls in type(mod).__mro__:
            rule = MODULE_RULES.get(cls)
            if rule is not None:
                break
    elif node.op == "call_function":
        try:
            rule = FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            rule = None
        if rule is None:
            key = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', '')}"
            rule = NAMED_FUNCTION_RULES.get(key)
    elif node.op == "call_method":
        rule = METHOD_RULES.get(str(node.target))
    elif node.op == "get_attr":
        return []
    if rule is None:
        raise Unsupported(f"no receptive-field rule for {describe(node, ctx.gm)}")
    # A rule that builds its regions from the per-axis masks alone drops the joint: the
    # product of the masks is a superset of the set.
    return rule(ctx, node, reg)


# ----------------------------------------------------------------------------- arg helpers


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _leading(reg: Region, n: int) -> list[Axis]:
    """The first ``n`` axes of a region, unchanged (batch / leading axes)."""
    return [replace(a) for a in reg.axes[:n]]


def _nodes_in(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(_nodes_in(v))
        elif isinstance(v, dict):
            out.extend(_nodes_in(v.values()))
        else:
            out.append(v)
    return out


# ----------------------------------------------------------------------------- selectors


def select_node(
    traced: TracedModel, key: str, selector: tuple[int | str, ...], name: str
) -> fx.Node | None:
    """The graph node of the part of module ``key``'s output that ``selector`` picks.

    Containers that the traced code built (tuples, dicts of proxies) are indexed directly; a
    step into one node's value (a leaf module returning a tuple) reuses the graph's own
    ``getitem`` node or adds one, with the shape taken from the node's metadata.

    Raises:
        ValueError: a step that matches nothing in a traced container.
    """
    if not selector:
        return traced.outputs.get(key)
    from erf_monitor.targets.outputs import select_output  # the run-time selection rules

    value: Any = traced.raw_outputs.get(key)
    for i, step in enumerate(selector):
        if isinstance(value, fx.Proxy):
            value = value.node
        if isinstance(value, fx.Node):
            value = _item_node(traced, value, step)
        else:
            value = select_output(value, (step,), name + "".join(f"[{s!r}]" for s in selector[:i]))
    if isinstance(value, fx.Proxy):
        value = value.node
    return value if isinstance(value, fx.Node) else None


def _item_node(traced: TracedModel, node: fx.Node, step: int | str) -> fx.Node:
    for user in node.users:
        if (
            user.op == "call_function"
            and user.target is operator.getitem
            and user.args
            == (
                node,
                step,
            )
        ):
            return user
    graph = traced.gm.graph
    with graph.inserting_after(node):
        new = graph.call_function(operator.getitem, (node, step))
    meta = node.meta.get("tensor_meta")
    with contextlib.suppress(LookupError, TypeError):
        new.meta["tensor_meta"] = meta[step]  # type: ignore[index]
    if node in traced.dependent:
        traced.dependent.add(new)
    return new


# ----------------------------------------------------------------------------- rules

# Op names shared by functions and tensor methods.


def _words(text: str) -> list[str]:
    return text.split()


_POINTWISE_NAMES = _words(
    """
    add sub mul div truediv floordiv true_divide rsub neg pos abs exp log log1p expm1 sqrt
    rsqrt pow square reciprocal sign sin cos tanh sigmoid relu relu6 relu_ leaky_relu
    leaky_relu_ elu elu_ selu celu gelu silu mish hardswish hardsigmoid hardtanh hardtanh_
    softplus softsign tanhshrink logsigmoid threshold prelu rrelu clamp clamp_ clamp_min
    clamp_max clip where maximum minimum fmax fmin lerp addcmul addcdiv masked_fill add_ sub_
    mul_ div_ sigmoid_ tanh_ exp_ neg_ abs_ sqrt_ pow_ fill_ zero_ iadd isub imul itruediv
    """
)

_UNARY_NAMES = _words(
    """
    batch_norm dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout
    contiguous clone detach float double half bfloat16 to type type_as local_response_norm
    """
)

_REDUCTION_NAMES = _words(
    """
    mean sum amax amin prod std var norm logsumexp nansum nanmean all any count_nonzero
    """
)

_RESHAPE_NAMES = _words(
    """
    view reshape flatten unflatten squeeze unsqueeze view_as reshape_as
    """
)
_PERMUTE_NAMES = ["permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"]


@op_rule(functions=_POINTWISE_NAMES, methods=_POINTWISE_NAMES)
def _pointwise(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    out_shape = ctx.shape(node)
    res: list[Contribution] = []
    for a in _nodes_in([*node.args, *node.kwargs.values()]):
        if ctx.is_tensor_input(a):
            res.append((a, broadcast_region(reg, out_shape, ctx.shape(a))))
    return res


def _first_input(ctx: _Ctx, node: fx.Node) -> fx.Node:
    x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    if not isinstance(x, fx.Node):
        raise Unsupported(f"first argument of {describe(node, ctx.gm)} is not a tensor")
    return x


@op_rule(
    modules=(
        nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
        nn.FeatureAlphaDropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU,
        nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
        nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
        nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.modules.batchnorm._BatchNorm,
    ),
    functions=_UNARY_NAMES,
    methods=_UNARY_NAMES,
    # torchvision: stochastic depth is the identity in eval mode (per-sample scaling otherwise).
    named=("torchvision.ops.stochastic_depth.stochastic_depth",),
)  # fmt: skip
def _unary(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    """Pointwise in its first argument only (extra args are shapes, dtypes, parameters)."""
    x = _first_input(ctx, node)
    if not ctx.is_tensor_input(x):
        return []
    return [(x, broadcast_region(reg, ctx.shape(node), ctx.shape(x)))]


def _mix_axes(reg: Region, shape: Sequence[int], axes: Iterable[int]) -> Region:
    new = [replace(a) for a in reg.axes]
    mixed = set(axes)
    for k in mixed:
        new[k] = full_axis(shape[k])
    kept = identity_map([d for d in range(len(shape)) if d not in mixed], shape)
    return with_joint(new, carry_joint(reg, kept), reg.local)


def _conv_geometry(
    ctx: _Ctx,
    node: fx.Node,
    reg: Region,
    x: fx.Node,
    kernel: Sequence[int],
    stride: Any,
    padding: Any,
    dilation: Any,
    *,
    mix_channels: bool,
    mode: str = "zeros",
) -> list[Contribution]:
    nd = len(kernel)
    in_shape = ctx.shape(x)
    stride_t, dil_t = ntuple(stride, nd), ntuple(dilation, nd)
    if isinstance(padding, str):
        if padding == "valid":
            pad_t: tuple[int, ...] = (0,) * nd
        elif padding == "same":
            pad_t = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dil_t))
        else:
            raise Unsupported(f"padding {padding!r}")
    else:
        pad_t = ntuple(padding, nd)
    lead = len(in_shape) - nd
    axes = _leading(reg, lead)
    mapping = identity_map(range(lead - 1 if mix_channels else lead), in_shape)
    if mix_channels:
        axes[-1] = full_axis(in_shape[lead - 1])
    out_shape = ctx.shape(node)
    for i in range(nd):
        d = lead + i
        geometry = (int(kernel[i]), int(stride_t[i]), int(pad_t[i]), int(dil_t[i]))
        axes.append(window_axis(reg.axes[d], in_shape[d], *geometry, mode))
        if reg.joint is not None and d in reg.joint.dims:
            mapping[d] = (d, window_taps(out_shape[d], in_shape[d], *geometry, mode), in_shape[d])
    return [(x, with_joint(axes, carry_joint(reg, mapping), reg.local and mode == "zeros"))]


@op_rule(modules=(nn.modules.conv._ConvNd,))
def _conv_module(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    m = ctx.gm.get_submodule(str(node.target))
    assert isinstance(m, nn.modules.conv._ConvNd)
    x = _first_input(ctx, node)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return _transposed(ctx, reg, x, m.kernel_size, m.stride, m.padding, m.dilation)
    return _conv_geometry(
        ctx, node, reg, x, m.kernel_size, m.stride, m.padding, m.dilation,
        mix_channels=True, mode=m.padding_mode,
    )  # fmt: skip


@op_rule(functions=("conv1d", "conv2d", "conv3d"))
def _conv_function(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    w = _arg(node, 1, "weight")
    kernel = ctx.shape(w)[2:]
    return _conv_geometry(
        ctx, node, reg, x, kernel, _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0),
        _arg(node, 5, "dilation", 1), mix_channels=True,
    )  # fmt: skip


def _transposed(
    ctx: _Ctx, reg: Region, x: fx.Node, kernel: Any, stride: Any, padding: Any, dilation: Any
) -> list[Contribution]:
    nd = len(kernel)
    in_shape = ctx.shape(x)
    lead = len(in_shape) - nd
    axes = _leading(reg, lead)
    axes[-1] = full_axis(in_shape[lead - 1])
    st, pt, dt = ntuple(stride, nd), ntuple(padding, nd), ntuple(dilation, nd)
    local = reg.local
    for i in range(nd):
        ax, nonempty = transposed_axis(
            reg.axes[lead + i], in_shape[lead + i], int(kernel[i]), int(st[i]), int(pt[i]),
            int(dt[i]),
        )  # fmt: skip
        if not nonempty:
            return []
        axes.append(ax)
        local = local and int(st[i]) == 1
    return [(x, Region(axes, local))]


@op_rule(functions=("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"))
def _conv_transpose_function(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    kernel = ctx.shape(_arg(node, 1, "weight"))[2:]
    return _transposed(
        ctx, reg, x, kernel, _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0),
        _arg(node, 7, "dilation", 1),
    )  # fmt: skip


def _spatial_rank(ctx: _Ctx, node: fx.Node) -> int:
    """1, 2 or 3 from a pooling module/function name (``MaxPool2d``, ``adaptive_avg_pool3d``)."""
    if node.op == "call_module":
        name = type(ctx.gm.get_submodule(str(node.target))).__name__
    else:
        name = getattr(node.target, "__name__", "")
    if name[-2:].lower() in ("1d", "2d", "3d"):
        return int(name[-2])
    raise Unsupported(f"cannot tell the spatial rank of {describe(node, ctx.gm)}")


@op_rule(
    modules=(
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.modules.pooling._LPPoolNd,
    )
)  # fmt: skip
def _pool_module(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    m = ctx.gm.get_submodule(str(node.target))
    x = _first_input(ctx, node)
    if getattr(m, "return_indices", False):
        raise Unsupported("pooling with return_indices")
    nd = _spatial_rank(ctx, node)
    kernel = ntuple(m.kernel_size, nd)
    stride = m.stride if m.stride else kernel
    return _conv_geometry(
        ctx, node, reg, x, kernel, stride, getattr(m, "padding", 0), getattr(m, "dilation", 1),
        mix_channels=False,
    )  # fmt: skip


def _pool_function(nd: int, has_dilation: bool) -> Rule:
    def rule(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
        x = _first_input(ctx, node)
        kernel = ntuple(_arg(node, 1, "kernel_size"), nd)
        stride = _arg(node, 2, "stride", None) or kernel
        dilation = _arg(node, 4, "dilation", 1) if has_dilation else 1
        if has_dilation and _arg(node, 6, "return_indices", False):
            raise Unsupported("pooling with return_indices")
        return _conv_geometry(
            ctx, node, reg, x, kernel, stride, _arg(node, 3, "padding", 0), dilation,
            mix_channels=False,
        )  # fmt: skip

    return rule


for _nd in (1, 2, 3):
    register_function(
        _pool_function(_nd, True), f"max_pool{_nd}d", f"_max_pool{_nd}d", namespaces=(F, torch)
    )
    register_function(_pool_function(_nd, False), f"avg_pool{_nd}d", namespaces=(F, torch))


def _adaptive_taps(n: int, o: int) -> Callable[[int], tuple[int, int]]:
    """Adaptive pooling window: ``floor(j*n/o) .. ceil((j+1)*n/o) - 1``."""

    def taps(j: int) -> tuple[int, int]:
        return (j * n) // o, -((-(j + 1) * n) // o) - 1

    return taps


@op_rule(
    modules=(
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    ),
    functions=[
        f"{kind}{nd}d" for nd in (1, 2, 3)
        for kind in ("adaptive_avg_pool", "adaptive_max_pool", "_adaptive_max_pool")
    ],
    namespaces=(F, torch),
)  # fmt: skip
def _adaptive(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    in_shape, out_shape = ctx.shape(x), ctx.shape(node)
    if len(in_shape) != len(out_shape):
        raise Unsupported("adaptive pooling changed the rank")
    nd = _spatial_rank(ctx, node)
    lead = len(in_shape) - nd
    axes = _leading(reg, lead)
    local = reg.local
    for i in range(nd):
        n, o = in_shape[lead + i], out_shape[lead + i]
        ax = reg.axes[lead + i]
        if n == o:
            axes.append(replace(ax))
        elif o == 1:
            axes.append(full_axis(n))
            local = False
        else:
            axes.append(table_axis(ax, n, _adaptive_taps(n, o), Fraction(n, o)))
            local = False
    return [(x, Region(axes, local))]


def _interp_taps(
    mode: str, align_corners: bool, n_in: int, n_out: int, scale: Fraction | None
) -> tuple[Callable[[int], tuple[int, int]], Fraction]:
    """Per-output unclamped source window of an interpolation along one axis, and its jump."""
    step: Fraction = Fraction(n_in, n_out) if scale is None else scale
    if mode in ("nearest", "nearest-exact"):
        shift = Fraction(1, 2) if mode == "nearest-exact" else Fraction(0)

        def near(o: int) -> tuple[int, int]:
            i = min(math.floor((o + shift) * step), n_in - 1)
            return i, i

        return near, step
    if mode not in ("linear", "bilinear", "trilinear", "bicubic"):
        raise Unsupported(f"interpolation mode {mode!r}")
    cubic = mode == "bicubic"
    if align_corners:
        step = Fraction(n_in - 1, n_out - 1) if n_out > 1 else Fraction(0)

    def src(o: int) -> Fraction:
        if align_corners:
            return o * step
        s = step * (o + Fraction(1, 2)) - Fraction(1, 2)
        # PyTorch clamps negative source coordinates to 0 (not for cubic); do the same
        # for in-plane indices so that the clipped set is exact.
        return s if cubic or s >= 0 or o < 0 else Fraction(0)

    def lin(o: int) -> tuple[int, int]:
        s = src(o)
        i0 = math.floor(s)
        exact = s == i0
        if cubic:
            return (i0, i0) if exact else (i0 - 1, i0 + 2)
        if o >= 0 and i0 >= n_in - 1:
            return i0, i0
        return (i0, i0) if exact else (i0, i0 + 1)

    return lin, step


def _interpolate_common(
    ctx: _Ctx,
    reg: Region,
    x: fx.Node,
    out_shape: Sequence[int],
    mode: str,
    align_corners: bool | None,
    scale_factor: Any,
    recompute: bool | None,
) -> list[Contribution]:
    in_shape = ctx.shape(x)
    nd = len(in_shape) - 2
    if mode == "area":
        mode_axes: list[Axis] = _leading(reg, 2)
        for i in range(nd):
            n, o = in_shape[2 + i], out_shape[2 + i]
            mode_axes.append(table_axis(reg.axes[2 + i], n, _adaptive_taps(n, o), Fraction(n, o)))
        return [(x, Region(mode_axes, False))]
    scales: tuple[Any, ...] = ntuple(scale_factor, nd) if scale_factor is not None else (None,) * nd
    axes = _leading(reg, 2)
    for i in range(nd):
        sf = scales[i]
        scale = Fraction(1) / Fraction(float(sf)) if sf is not None and not recompute else None
        taps, jump = _interp_taps(
            mode, bool(align_corners), in_shape[2 + i], out_shape[2 + i], scale
        )
        axes.append(table_axis(reg.axes[2 + i], in_shape[2 + i], taps, jump))
    return [(x, Region(axes, False))]


@op_rule(modules=(nn.Upsample,))
def _upsample_module(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    m = ctx.gm.get_submodule(str(node.target))
    assert isinstance(m, nn.Upsample)
    return _interpolate_common(
        ctx, reg, _first_input(ctx, node), ctx.shape(node), m.mode, m.align_corners,
        m.scale_factor, m.recompute_scale_factor,
    )  # fmt: skip


@op_rule(functions=("interpolate", "upsample"), namespaces=(F,))
def _interpolate_function(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    if _arg(node, 6, "antialias", False):
        raise Unsupported("interpolate with antialias=True")
    return _interpolate_common(
        ctx, reg, _first_input(ctx, node), ctx.shape(node), _arg(node, 3, "mode", "nearest"),
        _arg(node, 4, "align_corners", None), _arg(node, 2, "scale_factor", None),
        _arg(node, 5, "recompute_scale_factor", None),
    )  # fmt: skip


@op_rule(
    modules=(nn.PixelShuffle, nn.PixelUnshuffle),
    functions=("pixel_shuffle", "pixel_unshuffle"),
    namespaces=(F, torch),
)
def _pixel_shuffle(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    if node.op == "call_module":
        m = ctx.gm.get_submodule(str(node.target))
        unshuffle = isinstance(m, nn.PixelUnshuffle)
        r = int(getattr(m, "downscale_factor" if unshuffle else "upscale_factor"))
    else:
        unshuffle = "unshuffle" in getattr(node.target, "__name__", "")
        r = int(_arg(node, 1, "downscale_factor" if unshuffle else "upscale_factor"))
    in_shape = ctx.shape(x)
    axes = _leading(reg, len(in_shape) - 2)
    axes[-1] = full_axis(in_shape[-3])
    for i in (-2, -1):
        if unshuffle:
            axes.append(window_axis(reg.axes[i], in_shape[i], r, r, 0, 1))
        else:
            ax, _ = transposed_axis(reg.axes[i], in_shape[i], r, r, 0, 1)
            axes.append(ax)
    return [(x, Region(axes, reg.local and unshuffle))]


@op_rule(
    modules=(
        nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
        nn.modules.padding._ReplicationPadNd,
    ),
    functions=("pad",),
    namespaces=(F,),
)  # fmt: skip
def _pad(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    if node.op == "call_module":
        m = ctx.gm.get_submodule(str(node.target))
        pads = list(m.padding)  # type: ignore[arg-type]
        name = type(m).__name__
        mode = (
            "reflect" if name.startswith("Reflection") else "replicate"
            if name.startswith("Replication") else "circular"
            if name.startswith("Circular") else "constant"
        )  # fmt: skip
    else:
        pads = list(_arg(node, 1, "pad"))
        mode = _arg(node, 2, "mode", "constant")
    in_shape, out_shape = ctx.shape(x), ctx.shape(node)
    nd = len(pads) // 2
    axes = [replace(a) for a in reg.axes]
    mapping = identity_map(range(len(in_shape)), in_shape)
    for i in range(nd):
        k = len(in_shape) - 1 - i
        left = int(pads[2 * i])
        axes[k] = window_axis(reg.axes[k], in_shape[k], 1, 1, left, 1, mode)
        taps = window_taps(out_shape[k], in_shape[k], 1, 1, left, 1, mode)
        mapping[k] = (k, taps, in_shape[k])
    local = reg.local and mode == "constant"
    return [(x, with_joint(axes, carry_joint(reg, mapping), local))]


_circular = getattr(nn.modules.padding, "_CircularPadNd", None)
if _circular is not None:
    register_module(_pad, _circular)


@op_rule(functions=("roll",), namespaces=(torch,), methods=("roll",))
def _roll(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    """``torch.roll``: a cyclic shift along each rolled axis (Swin's shifted windows)."""
    x = _first_input(ctx, node)
    shape = ctx.shape(x)
    shifts = ntuple(_arg(node, 1, "shifts"), 1)
    dims = _arg(node, 2, "dims", None)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        raise Unsupported("torch.roll of the flattened tensor (no dims)")
    dims = ntuple(dims, 1)
    if len(shifts) != len(dims) or any(isinstance(v, fx.Node) for v in (*shifts, *dims)):
        raise Unsupported("torch.roll with shifts computed at run time")
    axes = [replace(a) for a in reg.axes]
    mapping = identity_map(range(len(shape)), shape)
    for shift, dim in zip(shifts, dims):
        d = _norm_dim(int(dim), len(shape))
        axes[d] = roll_axis(axes[d], int(shift))
        mapping[d] = (d, roll_taps(shape[d], int(shift)), shape[d])
    # A batch roll mixes samples; a spatial one moves pixels across the image.
    return [(x, with_joint(axes, carry_joint(reg, mapping), False))]


@op_rule(functions=_REDUCTION_NAMES, namespaces=(torch,), methods=_REDUCTION_NAMES)
def _reduction(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    in_shape = ctx.shape(x)
    dim = _arg(node, 1, "dim", None)
    if dim is None and "axis" in node.kwargs:
        dim = node.kwargs["axis"]
    if isinstance(dim, fx.Node) or (dim is not None and not isinstance(dim, (int, list, tuple))):
        raise Unsupported(f"{describe(node, ctx.gm)} with a non-integer dim")
    dims = (
        set(range(len(in_shape)))
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0)
        else {_norm_dim(int(d), len(in_shape)) for d in ntuple(dim, 1)}
    )
    out_shape = shape_of(node)
    keep = out_shape is not None and len(out_shape) == len(in_shape)
    axes: list[Axis] = []
    mapping: AxisMap = {}
    j = 0
    for k in range(len(in_shape)):
        if k in dims:
            axes.append(full_axis(in_shape[k]))
            if keep:
                j += 1
        else:
            axes.append(replace(reg.axes[j]))
            mapping[k] = (j, None, in_shape[k])
            j += 1
    return [(x, with_joint(axes, carry_joint(reg, mapping), reg.local))]


@op_rule(functions=("max", "min"), namespaces=(torch,), methods=("max", "min"))
def _max_min(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    other = _arg(node, 1, "other", None)
    if isinstance(other, fx.Node) and shape_of(other) is not None:
        return _pointwise(ctx, node, reg)  # torch.max(a, b): elementwise
    if _arg(node, 1, "dim", None) is None:
        return _reduction(ctx, node, reg)  # torch.max(x): over everything
    raise Unsupported(f"{describe(node, ctx.gm)} with dim used as a tensor")


@op_rule(
    modules=(nn.Softmax, nn.LogSoftmax, nn.Softmin),
    functions=("softmax", "log_softmax", "softmin"),
    namespaces=(torch, F),
    methods=("softmax", "log_softmax"),
)
def _softmax(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    shape = ctx.shape(x)
    if node.op == "call_module":
        dim = getattr(ctx.gm.get_submodule(str(node.target)), "dim", None)
    else:
        dim = _arg(node, 1, "dim", None)
    if dim is None:
        raise Unsupported("softmax without an explicit dim")
    d = _norm_dim(int(dim), len(shape))
    logits = ctx.masks.logits(x)
    if logits is None or math.prod(shape) > _DENSE_BUDGET:
        return [(x, _mix_axes(reg, shape, [d]))]
    ctx.masked = ctx.masked or bool(logits.any())
    # Masked logits (see erf_monitor.trf.masks) do not move the row's weights: each row reads
    # its live entries only.
    full = logits.expand(shape)
    live = ~(full & ~full.all(dim=d, keepdim=True))
    rows = torch.from_numpy(dense(reg, [k for k in range(len(shape)) if k != d])).unsqueeze(d)
    axes = [replace(a) for a in reg.axes]
    axes[d] = full_axis(shape[d])
    return [(x, joined(axes, range(len(shape)), (rows & live).numpy(), reg.local))]


@op_rule(modules=(nn.Linear,), functions=("linear",), namespaces=(F, torch.nn.functional))
def _linear(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    shape = ctx.shape(x)
    return [(x, _mix_axes(reg, shape, [len(shape) - 1]))]


@op_rule(modules=(nn.LayerNorm,), functions=("layer_norm", "rms_norm"), namespaces=(F,))
def _layer_norm(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    shape = ctx.shape(x)
    if node.op == "call_module":
        ns = ctx.gm.get_submodule(str(node.target)).normalized_shape
    else:
        ns = _arg(node, 1, "normalized_shape")
    k = len(ntuple(ns, 1))
    return [(x, _mix_axes(reg, shape, range(len(shape) - k, len(shape))))]


_rms = getattr(nn, "RMSNorm", None)
if _rms is not None:
    register_module(_layer_norm, _rms)


@op_rule(modules=(nn.GroupNorm,), functions=("group_norm",), namespaces=(F,))
def _group_norm(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    shape = ctx.shape(x)
    return [(x, _mix_axes(reg, shape, range(1, len(shape))))]


@op_rule(modules=(nn.modules.instancenorm._InstanceNorm,))
def _instance_norm(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    m = ctx.gm.get_submodule(str(node.target))
    if getattr(m, "track_running_stats", False):
        return _unary(ctx, node, reg)  # eval mode: running statistics, pointwise
    x = _first_input(ctx, node)
    shape = ctx.shape(x)
    return [(x, _mix_axes(reg, shape, range(len(shape) - (len(shape) - 2), len(shape))))]


@op_rule(modules=(nn.Softmax2d, nn.LocalResponseNorm, nn.ChannelShuffle))
def _channel_mix(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    shape = ctx.shape(x)
    return [(x, _mix_axes(reg, shape, [1 if len(shape) > 1 else 0]))]


#: Largest dense set (elements) an attention rule builds; beyond it, masks are ignored.
_DENSE_BUDGET = 1 << 25


def _attention_regions(
    reg: Region, out_shape: Sequence[int], zero: torch.Tensor | None, n_keys: int
) -> tuple[Region, Region]:
    """Regions of ``w`` (..., M, K) and ``v`` (..., K, N) in ``out = w @ v`` (..., M, N) as
    broadcast to the output's batch dims, from the output's region; ``zero``: entries of
    ``w`` that a mask made zero (None: none known). A row reads the keys it has weight on."""
    nb = len(out_shape) - 2
    rows_dims = list(range(nb + 1))  # batch..., M
    w_axes = [*(replace(a) for a in reg.axes[:-1]), full_axis(n_keys)]
    v_axes = [*(replace(a) for a in reg.axes[:-2]), full_axis(n_keys), replace(reg.axes[-1])]
    size = math.prod(out_shape[:-1]) * n_keys
    if zero is None or size > _DENSE_BUDGET:
        w = with_joint(w_axes, carry_joint(reg, identity_map(rows_dims, out_shape)), reg.local)
        kept = identity_map([*range(nb), nb + 1], out_shape)
        return w, with_joint(v_axes, carry_joint(reg, kept), reg.local)
    rows = torch.from_numpy(dense(reg, rows_dims))
    live = rows.unsqueeze(-1) & ~zero.expand(*out_shape[:-1], n_keys)
    w = joined(w_axes, [*rows_dims, nb + 1], live.numpy(), reg.local)
    keys = live.any(dim=nb)  # batch..., K
    return w, joined(v_axes, [*range(nb), nb], keys.numpy(), reg.local)


def _with_last(reg: Region, n: int) -> Region:
    """``reg`` with its last axis replaced by a full one of size ``n`` (read entirely)."""
    axes = [*(replace(a) for a in reg.axes[:-1]), full_axis(n)]
    kept = identity_map(range(len(axes) - 1), [a.mask.size for a in axes])
    return with_joint(axes, carry_joint(reg, kept), reg.local)


@op_rule(
    functions=("matmul", "bmm", "mm"),
    namespaces=(torch, operator),
    methods=("matmul", "bmm", "mm", "__matmul__"),
)
def _matmul(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    if b is None:
        b = _arg(node, 1, "mat2")
    out_shape = ctx.shape(node)
    if len(out_shape) < 2 or any(ctx.is_tensor_input(t) and len(ctx.shape(t)) < 2 for t in (a, b)):
        raise Unsupported("matmul with a 1-D operand")
    sa, sb = shape_of(a), shape_of(b)
    if sa is None and sb is None:
        raise Unsupported("matmul without operand shapes")
    n_inner = sa[-1] if sa is not None else sb[-2]  # type: ignore[index]
    zero = ctx.masks.weights(a)
    ctx.masked = ctx.masked or (zero is not None and bool(zero.any()))
    w, v = _attention_regions(reg, out_shape, zero, n_inner)
    res: list[Contribution] = []
    if ctx.is_tensor_input(a) and sa is not None:
        res.append((a, broadcast_region(w, (*out_shape[:-1], n_inner), sa)))
    if ctx.is_tensor_input(b) and sb is not None:
        res.append((b, broadcast_region(v, (*out_shape[:-2], n_inner, out_shape[-1]), sb)))
    return res


@op_rule(functions=("scaled_dot_product_attention",), namespaces=(F,))
def _sdpa(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    q, k, v = _arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value")
    out_shape = ctx.shape(node)
    n_keys = ctx.shape(k)[-2] if shape_of(k) is not None else ctx.shape(v)[-2]
    zero = _sdpa_zero(ctx, node, (*out_shape[:-1], n_keys))
    ctx.masked = ctx.masked or (zero is not None and bool(zero.any()))
    w, vals = _attention_regions(reg, out_shape, zero, n_keys)
    res: list[Contribution] = []
    for t, region, n_last in ((q, w, None), (k, vals, None), (v, vals, out_shape[-1])):
        if not ctx.is_tensor_input(t):
            continue
        s = ctx.shape(t)
        # q's rows and k's keys read their whole feature axis; v's keeps the output's.
        r = region if n_last is not None else _with_last(region, s[-1])
        res.append((t, broadcast_region(r, (*out_shape[:-2], r.axes[-2].mask.size, s[-1]), s)))
    return res


def _sdpa_zero(ctx: _Ctx, node: fx.Node, shape: Sequence[int]) -> torch.Tensor | None:
    """The weights of ``scaled_dot_product_attention`` that its mask makes zero."""
    mask = _arg(node, 3, "attn_mask", None)
    zero: torch.Tensor | None = None
    if isinstance(mask, fx.Node):
        value = ctx.masks.constant(mask)
        boolean = value is not None and value.dtype == torch.bool
        zero = ~value if boolean and value is not None else ctx.masks.logits(mask)
    if _arg(node, 5, "is_causal", False):
        m, n = shape[-2], shape[-1]
        causal = torch.ones(m, n, dtype=torch.bool).tril().logical_not()
        zero = causal if zero is None else zero | causal
    if zero is None:
        return None
    full = zero.expand(*shape)
    return full & ~full.all(dim=-1, keepdim=True)


def _everything_mixed(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    res: list[Contribution] = []
    for a in _nodes_in([*node.args, *node.kwargs.values()]):
        if ctx.is_tensor_input(a):
            s = ctx.shape(a)
            res.append((a, Region([full_axis(n) for n in s], reg.local)))
    return res


def _sampling(what: str, *positions: tuple[int, str]) -> Rule:
    """Rule of an op that reads its input at positions given by other arguments.

    Positions computed from the input (a deformable convolution's offsets, a predicted
    ``grid_sample`` grid, predicted RoI boxes) make the field data-dependent: every input is
    needed entirely and the walk records why. Fixed positions (a constant grid) have no
    geometric rule here: the numeric method measures them.
    """

    def rule(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
        values = [_arg(node, i, name) for i, name in positions]
        if not any(ctx.depends_on_values(n) for n in _nodes_in(values)):
            raise Unsupported(f"{what} with sampling positions that do not depend on the input")
        ctx.data_dependent.append(f"{what} samples the input at positions computed from it")
        # The field is the whole input whatever else the positions read: walk on the sampled
        # tensor only.
        x = _first_input(ctx, node)
        if not ctx.is_tensor_input(x):
            return []
        return [(x, Region([full_axis(n) for n in ctx.shape(x)], reg.local))]

    return rule


# Data-dependent sampling (torch and torchvision; torchvision's functions by name).
_grid = _sampling("grid_sample", (1, "grid"))
register_function(_grid, "grid_sample", namespaces=(F,))
register_function(_grid, "grid_sampler", "grid_sampler_2d", "grid_sampler_3d", namespaces=(torch,))
register_named(
    _sampling("deform_conv2d", (1, "offset"), (7, "mask")),
    "torchvision.ops.deform_conv.deform_conv2d",
)
for _op in ("roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool"):
    register_named(_sampling(_op, (1, "boxes")), f"torchvision.ops.{_op}.{_op}")
register_named(
    _sampling("MultiScaleRoIAlign", (1, "boxes")), "torchvision.ops.poolers._multiscale_roi_align"
)


@op_rule(functions=("cat", "concat", "concatenate"), namespaces=(torch,))
def _cat(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)):
        raise Unsupported("cat of a non-list")
    out_shape = ctx.shape(node)
    dim = _norm_dim(int(dim), len(out_shape))
    res: list[Contribution] = []
    off = 0
    for t in tensors:
        s = shape_of(t)
        if s is None:
            continue
        n = s[dim]
        if isinstance(t, fx.Node) and t in ctx.traced.dependent:
            ax = reg.axes[dim]
            mask = ax.mask[off : off + n].copy()
            if ax.mixed:
                part = Axis(None, None, mask, True, ax.jump)
            else:
                lo, hi = max(_bound(ax.lo), off), min(_bound(ax.hi), off + n - 1)
                if lo > hi and not mask.any():
                    off += n
                    continue
                part = Axis(lo - off, hi - off, mask, False, ax.jump, ax.wrap)
            axes = [replace(a) for a in reg.axes]
            axes[dim] = part
            local = reg.local and (n == out_shape[dim] or dim < 2)
            o = np.arange(out_shape[dim], dtype=np.int64) - off
            taps = np.where((o >= 0) & (o < n), o, -1)[:, None]
            mapping = identity_map(range(len(out_shape)), out_shape)
            mapping[dim] = (dim, taps, n)
            res.append((t, with_joint(axes, carry_joint(reg, mapping), local)))
        off += n
    return res


def _bound(v: int | None) -> int:
    if v is None:
        raise Unsupported("internal: unbounded interval on a non-mixed axis")
    return v


@op_rule(functions=("stack",), namespaces=(torch,))
def _stack(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    tensors = _arg(node, 0, "tensors")
    out_shape = ctx.shape(node)
    dim = _norm_dim(int(_arg(node, 1, "dim", 0)), len(out_shape))
    res: list[Contribution] = []
    for i, t in enumerate(tensors):
        if ctx.is_tensor_input(t) and reg.axes[dim].mask[i]:
            axes = [replace(a) for k, a in enumerate(reg.axes) if k != dim]
            res.append((t, Region(axes, reg.local and dim < 2)))
    return res


@op_rule(
    modules=(nn.Flatten, nn.Unflatten),
    functions=_RESHAPE_NAMES,
    namespaces=(torch,),
    methods=_RESHAPE_NAMES,
)
def _reshape(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    return [(x, reshape_region(reg, ctx.shape(x), ctx.shape(node)))]


def _permutation(ctx: _Ctx, node: fx.Node, ndim: int) -> list[int]:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    dims: Any
    if name == "permute":
        rest = node.args[1:]
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        if not dims:
            dims = node.kwargs.get("dims")
        return [_norm_dim(int(d), ndim) for d in dims]
    if name in ("transpose", "swapaxes", "swapdims"):
        a = _norm_dim(int(_arg(node, 1, "dim0")), ndim)
        b = _norm_dim(int(_arg(node, 2, "dim1")), ndim)
        perm = list(range(ndim))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if name in ("movedim", "moveaxis"):
        src = [_norm_dim(int(d), ndim) for d in ntuple(_arg(node, 1, "source"), 1)]
        dst = [_norm_dim(int(d), ndim) for d in ntuple(_arg(node, 2, "destination"), 1)]
        order = [d for d in range(ndim) if d not in src]
        perm = [-1] * ndim
        for s, d in zip(src, dst):
            perm[d] = s
        it = iter(order)
        return [p if p >= 0 else next(it) for p in perm]
    raise Unsupported(f"axis permutation {name!r}")


@op_rule(functions=_PERMUTE_NAMES, namespaces=(torch,), methods=_PERMUTE_NAMES)
def _permute(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    ndim = len(ctx.shape(x))
    perm = _permutation(ctx, node, ndim)
    axes: list[Axis] = [full_axis(1)] * ndim
    for k, src in enumerate(perm):
        axes[src] = replace(reg.axes[k])
    mapping = {src: (k, None, axes[src].mask.size) for k, src in enumerate(perm)}
    return [(x, with_joint(axes, carry_joint(reg, mapping), reg.local))]


@op_rule(
    functions=("broadcast_to",),
    namespaces=(torch,),
    methods=("expand", "expand_as", "broadcast_to"),
)
def _expand(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    return [(x, broadcast_region(reg, ctx.shape(node), ctx.shape(x)))]


def _index_region(
    ctx: _Ctx, node: fx.Node, reg: Region, x: fx.Node, index: Any
) -> list[Contribution]:
    in_shape = ctx.shape(x)
    idx = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in idx):
        raise Unsupported("advanced (tensor/list) indexing")
    if any(
        isinstance(i, slice) and any(isinstance(v, fx.Node) for v in (i.start, i.stop, i.step))
        for i in idx
    ):
        raise Unsupported("slicing with bounds computed at run time (e.g. x[:, :H] of a size)")
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        idx = idx[:e] + [slice(None)] * (len(in_shape) - n_real) + idx[e + 1 :]
    idx += [slice(None)] * (len(in_shape) - sum(1 for i in idx if i is not None))
    axes: list[Axis] = []
    mapping: AxisMap = {}
    j = 0  # output axis
    k = 0  # input axis
    local = reg.local
    for i in idx:
        if i is None:
            j += 1
            continue
        n = in_shape[k]
        if isinstance(i, int):
            axes.append(point_axis(n, _norm_dim(i, n)))
            local = local and k < 2
        elif isinstance(i, slice):
            start, _stop, step = i.indices(n)
            ax = reg.axes[j]
            taps = start + step * np.arange(ax.mask.size, dtype=np.int64)[:, None]
            mapping[k] = (j, taps, n)
            if (start, step) == (0, 1):
                new = replace(ax)
                if new.mask.size != n:
                    full = np.zeros(n, dtype=bool)
                    full[: new.mask.size] = new.mask
                    new.mask = full
                    local = local and k < 2
                axes.append(new)
            else:
                axes.append(window_axis(ax, n, 1, step, -start, 1))
                local = local and k < 2
            j += 1
        else:
            raise Unsupported(f"index {i!r}")
        k += 1
    return [(x, with_joint(axes, carry_joint(reg, mapping), local))]


@op_rule(functions=("getitem",), namespaces=(operator,))
def _getitem(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    src, index = node.args[0], node.args[1]
    if not isinstance(src, fx.Node):
        raise Unsupported("getitem on a non-node")
    if shape_of(src) is not None:
        return _index_region(ctx, node, reg, src, index)
    # An element of a multi-output op: handle the producer here.
    if src.op == "call_module":
        mod = ctx.gm.get_submodule(str(src.target))
        if isinstance(mod, nn.MultiheadAttention) and index == 0:
            return _sequence_mixer(ctx, src, reg, 0 if mod.batch_first else 1)
        raise Unsupported(f"output {index!r} of {describe(src, ctx.gm)}")
    name = str(src.target) if src.op == "call_method" else getattr(src.target, "__name__", "")
    x = _first_input(ctx, src)
    if name in ("max", "min", "sort", "topk", "median", "mode", "kthvalue") and index == 0:
        if name in ("max", "min", "median", "mode") and (
            _arg(src, 1, "dim", None) is None or isinstance(_arg(src, 1, "dim", None), fx.Node)
        ):
            raise Unsupported(f"{name} without dim")
        dim = _arg(src, 1, "dim", -1)
        in_shape = ctx.shape(x)
        d = _norm_dim(int(dim if name not in ("topk", "kthvalue") else _arg(src, 2, "dim", -1)),
                      len(in_shape))  # fmt: skip
        out_shape = shape_of(node)
        keep = out_shape is not None and len(out_shape) == len(in_shape)
        axes = [replace(a) for a in reg.axes]
        if keep:
            axes[d] = full_axis(in_shape[d])
        else:
            axes.insert(d, full_axis(in_shape[d]))
        return [(x, Region(axes, reg.local))]
    if name in ("split", "chunk", "tensor_split", "unbind") and isinstance(index, int):
        meta = src.meta.get("tensor_meta")
        if not isinstance(meta, (list, tuple)):
            raise Unsupported(f"{name} without shape metadata")
        in_shape = ctx.shape(x)
        default_dim = 0
        dim_pos = 2 if name in ("split", "chunk", "tensor_split") else 1
        d = _norm_dim(int(_arg(src, dim_pos, "dim", default_dim)), len(in_shape))
        local = reg.local and d < 2
        if name == "unbind":
            axes = [replace(a) for a in reg.axes]
            axes.insert(d, point_axis(in_shape[d], index))
            shifted = {k: (k if k < d else k - 1, None, in_shape[k]) for k in range(len(in_shape))}
            del shifted[d]
            return [(x, with_joint(axes, carry_joint(reg, shifted), local))]
        sizes = [int(m.shape[d]) for m in meta]
        off = sum(sizes[:index])
        ax = reg.axes[d]
        axes = [replace(a) for a in reg.axes]
        axes[d] = window_axis(ax, in_shape[d], 1, 1, -off, 1)
        mapping = identity_map(range(len(in_shape)), in_shape)
        mapping[d] = (d, off + np.arange(sizes[index], dtype=np.int64)[:, None], in_shape[d])
        return [(x, with_joint(axes, carry_joint(reg, mapping), local))]
    raise Unsupported(f"output {index!r} of {describe(src, ctx.gm)}")


def _sequence_mixer(ctx: _Ctx, node: fx.Node, reg: Region, batch_dim: int) -> list[Contribution]:
    """Attention-like op on ``(N, L, D)`` (``(L, N, D)`` when ``batch_dim`` is 1) sequences.

    Every token and feature of the same sample is read (global along the sequence), but
    samples stay apart: the batch axis keeps the output's region, so windowed attention on
    batch-merged windows (Swin) reads its own window only. Other inputs (masks, unbatched
    sequences) are read entirely.
    """
    res: list[Contribution] = []
    for a in _nodes_in([*node.args, *node.kwargs.values()]):
        if not ctx.is_tensor_input(a):
            continue
        s = ctx.shape(a)
        axes = [full_axis(n) for n in s]
        if len(s) == 3 and len(reg.axes) == 3 and s[batch_dim] == reg.axes[batch_dim].mask.size:
            axes[batch_dim] = replace(reg.axes[batch_dim])
        res.append((a, Region(axes, reg.local)))
    return res


@op_rule(modules=(nn.MultiheadAttention,))
def _mha_module(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    return _everything_mixed(ctx, node, reg)


@op_rule(
    modules=(
        nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
        nn.TransformerDecoder, nn.Transformer,
    )
)  # fmt: skip
def _transformer_module(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    """``nn.TransformerEncoderLayer`` & co. (fx leaves): attention within each sample."""
    mod = ctx.gm.get_submodule(str(node.target))
    first = next((m for m in mod.modules() if isinstance(m, nn.MultiheadAttention)), None)
    if first is None:
        return _everything_mixed(ctx, node, reg)
    return _sequence_mixer(ctx, node, reg, 0 if first.batch_first else 1)
