"""Analytic theoretical receptive fields: a backward index-box walk over a torch.fx graph.

The model is traced symbolically (every module call, containers included, is recorded by path
so that a requested layer's output node is known), shapes are propagated on a zeros input, and
then, starting from the layer's output node, a *region* is walked backward to the input:

* per tensor axis an unclipped inclusive interval ``[lo, hi]`` (indices as if every plane were
  infinite: padding never clips it), the exact set of in-bounds indices that can influence the
  seed (a boolean mask: the per-axis projection of the influencing set, so hulls of unions
  stay exact), a ``mixed`` flag (a global op needs the whole axis) and the effective stride
  ("jump") accumulated along the path;
* fan-in (residual adds, concatenations, branches) takes the union of the regions.

Each op kind has one rule in the tables at the bottom (``_MODULE_RULES``, ``_FUNCTION_RULES``,
``_METHOD_RULES``): a rule maps the region of an op's output to regions of its tensor inputs.
An op without a rule raises :class:`Unsupported` (the caller falls back to the numeric method).
To support a new op, add a rule there.
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from erf_monitor.core.buffers import preserved_buffers

__all__ = [
    "Axis",
    "Region",
    "TracedModel",
    "Unsupported",
    "select_node",
    "trace_model",
    "walk",
]

Mask = npt.NDArray[np.bool_]
_ROOT = "model"


class Unsupported(Exception):
    """The fx analysis cannot follow this model (tracing failed or an op has no rule)."""


# ----------------------------------------------------------------------------- regions


@dataclass
class Axis:
    """Region of one tensor axis (see the module docstring)."""

    lo: int | None  # unclipped interval; None when ``mixed``
    hi: int | None
    mask: Mask  # in-bounds indices that can influence the seed
    mixed: bool = False  # a global op needs this whole axis
    jump: Fraction | None = Fraction(1)  # input pixels per unit along this axis (None: no map)
    wrap: bool = False  # circular padding folded part of the interval onto the far side

    def union(self, other: Axis) -> Axis:
        mixed = self.mixed or other.mixed
        jumps = [j for j in (self.jump, other.jump) if j is not None]
        return Axis(
            None if mixed else min(_int(self.lo), _int(other.lo)),
            None if mixed else max(_int(self.hi), _int(other.hi)),
            self.mask | other.mask,
            mixed,
            max(jumps) if jumps else None,
            self.wrap or other.wrap,
        )


@dataclass
class Region:
    """Per-axis region of one tensor, plus whether every op so far was local.

    ``data_dependent`` (set on the input's region by :func:`walk`) names an op on the way
    that samples the input at positions computed from the input.
    """

    axes: list[Axis]
    local: bool = True
    data_dependent: str = ""

    def union(self, other: Region) -> Region:
        if len(self.axes) != len(other.axes):
            raise Unsupported("regions of different rank met at one tensor")
        return Region(
            [a.union(b) for a, b in zip(self.axes, other.axes)], self.local and other.local
        )


def _int(v: int | None) -> int:
    if v is None:
        raise Unsupported("internal: unbounded interval on a non-mixed axis")
    return v


def full_axis(n: int, *, mixed: bool = True, jump: Fraction | None = None) -> Axis:
    """An axis needed entirely (``mixed``: because a global op reads all of it)."""
    if mixed:
        return Axis(None, None, np.ones(n, dtype=bool), True, jump)
    return Axis(0, n - 1, np.ones(n, dtype=bool), False, jump)


def point_axis(n: int, i: int) -> Axis:
    """Axis of size ``n`` where only index ``i`` is needed."""
    mask = np.zeros(n, dtype=bool)
    mask[i] = True
    return Axis(i, i, mask, False, Fraction(1))


def _mask_from(vals: npt.NDArray[np.int64], n: int) -> Mask:
    mask = np.zeros(n, dtype=bool)
    mask[vals] = True
    return mask


def _fold(vals: npt.NDArray[np.int64], n: int, mode: str) -> npt.NDArray[np.int64]:
    """Map (possibly out-of-range) indices of a padded plane onto the real indices they read."""
    if mode in ("zeros", "constant"):
        return vals[(vals >= 0) & (vals < n)]
    if mode == "replicate":
        return np.clip(vals, 0, n - 1)
    if mode == "circular":
        return np.mod(vals, n)
    if mode == "reflect":
        if n == 1:
            return np.zeros_like(vals)
        period = 2 * (n - 1)
        v = np.mod(np.abs(vals), period)
        return np.where(v >= n, period - v, v)
    raise Unsupported(f"padding mode {mode!r}")


def _times(j: Fraction | None, s: Fraction | int) -> Fraction | None:
    return None if j is None else j * s


def window_axis(ax: Axis, n_in: int, k: int, s: int, p: int, d: int, mode: str = "zeros") -> Axis:
    """Conv/pool geometry: output ``o`` reads inputs ``o*s - p + d*t`` for ``t < k``."""
    idx = np.flatnonzero(ax.mask).astype(np.int64)
    vals = (idx[:, None] * s - p + d * np.arange(k, dtype=np.int64)[None, :]).ravel()
    mask = _mask_from(_fold(vals, n_in, mode), n_in)
    if ax.mixed:
        return Axis(None, None, mask, True, _times(ax.jump, s))
    lo, hi = _int(ax.lo) * s - p, _int(ax.hi) * s - p + d * (k - 1)
    wrap = ax.wrap or (mode == "circular" and bool(((vals < 0) | (vals >= n_in)).any()))
    return Axis(lo, hi, mask, False, _times(ax.jump, s), wrap)


def transposed_axis(ax: Axis, n_in: int, k: int, s: int, p: int, d: int) -> tuple[Axis, bool]:
    """Transposed-conv geometry: output ``o`` receives input ``i`` iff ``o = i*s - p + d*t``.

    Returns the axis and whether the unclipped set is non-empty.
    """
    taps = d * np.arange(k, dtype=np.int64)

    def sources(outs: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        num = (outs[:, None] + p - taps[None, :]).ravel()
        return num[np.mod(num, s) == 0] // s

    idx = np.flatnonzero(ax.mask).astype(np.int64)
    src = sources(idx)
    mask = _mask_from(src[(src >= 0) & (src < n_in)], n_in)
    jump = None if ax.jump is None else ax.jump / s
    if ax.mixed:
        return Axis(None, None, mask, True, jump), True
    lo, hi = _int(ax.lo), _int(ax.hi)
    unclipped = sources(np.arange(lo, hi + 1, dtype=np.int64))
    if unclipped.size == 0:
        return Axis(0, -1, mask, False, jump, ax.wrap), False
    return Axis(int(unclipped.min()), int(unclipped.max()), mask, False, jump, ax.wrap), True


def table_axis(
    ax: Axis, n_in: int, taps: Callable[[int], tuple[int, int]], jump: Fraction | None
) -> Axis:
    """Geometry given by a monotone per-output window ``taps(o) -> (first, last)`` (unclamped)."""
    mask = np.zeros(n_in, dtype=bool)
    for o in np.flatnonzero(ax.mask):
        a, b = taps(int(o))
        a, b = max(a, 0), min(b, n_in - 1)
        if a <= b:
            mask[a : b + 1] = True
    new_jump = None if ax.jump is None or jump is None else ax.jump * jump
    if ax.mixed:
        return Axis(None, None, mask, True, new_jump)
    return Axis(taps(_int(ax.lo))[0], taps(_int(ax.hi))[1], mask, False, new_jump, ax.wrap)


# ----------------------------------------------------------------------------- tracing


class _Root(nn.Module):
    def __init__(
        self, model: nn.Module, forward_fn: Callable[[nn.Module, torch.Tensor], Any] | None
    ) -> None:
        super().__init__()
        self.model = model
        self._fn = forward_fn

    def forward(self, x: torch.Tensor) -> Any:
        if self._fn is None:
            return self.model(x)
        return self._fn(self.model, x)


def _canonical(path: str) -> str:
    parts = path.split(".")
    if parts and parts[0] == _ROOT:
        parts = parts[1:]
    return ".".join(p for p in parts if p != "_orig_mod")


class _Tracer(fx.Tracer):
    """Records the output node of the first call of every module (containers included)."""

    def __init__(self, aliases: dict[int, list[str]]) -> None:
        super().__init__(autowrap_functions=_autowrap_functions())
        self.aliases = aliases
        self.outputs: dict[str, fx.Node | None] = {}
        self.raw_outputs: dict[str, Any] = {}  # what the call returned (proxies in containers)
        self.leaf_paths: set[str] = set()

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        inner = getattr(m, "_orig_mod", None)
        if isinstance(inner, nn.Module) and type(m).__name__ == "OptimizedModule":
            # A torch.compile'd submodule: fx cannot trace dynamo frames, so trace the eager
            # module it wraps (same canonical name, same function).
            return self.call_module(inner, inner.forward, args, kwargs)
        path = self.path_of_module(m)
        out = super().call_module(m, forward, args, kwargs)
        node = out.node if isinstance(out, fx.Proxy) else None
        for name in self.aliases.get(id(m), [_canonical(path)]):
            self.outputs.setdefault(name, node)
            self.raw_outputs.setdefault(name, out)
        if self.is_leaf_module(m, path):
            self.leaf_paths.add(_canonical(path))
        return out


def _autowrap_functions() -> tuple[Callable[..., Any], ...]:
    """Functions of optional packages recorded as one call instead of being traced into.

    Only those already imported (a model that uses them has imported them).
    """
    import sys

    found = []
    for module, name in _AUTOWRAP:
        fn = getattr(sys.modules.get(module), name, None)
        if callable(fn):
            found.append(fn)
    return tuple(found)


#: torchvision ops that fx cannot trace into (they branch on or assert about tensor values);
#: ``torch.fx.wrap`` in torchvision covers only calls from torchvision's own modules.
_AUTOWRAP = (
    ("torchvision.ops.deform_conv", "deform_conv2d"),
    ("torchvision.ops.roi_align", "roi_align"),
    ("torchvision.ops.roi_pool", "roi_pool"),
    ("torchvision.ops.ps_roi_align", "ps_roi_align"),
    ("torchvision.ops.ps_roi_pool", "ps_roi_pool"),
)


@dataclass
class TracedModel:
    """A traced, shape-propagated model ready for :func:`walk`."""

    gm: fx.GraphModule
    placeholder: fx.Node
    outputs: dict[str, fx.Node | None]  # canonical layer name -> output node of first call
    leaf_paths: set[str]
    dependent: set[fx.Node] = field(default_factory=set)  # nodes that depend on the input
    raw_outputs: dict[str, Any] = field(default_factory=dict)  # for output selectors


def trace_model(
    model: nn.Module,
    forward_fn: Callable[[nn.Module, torch.Tensor], Any] | None,
    input_shape: Sequence[int],
) -> TracedModel:
    """Trace ``model`` with fx and propagate shapes for a batch-1 zeros input.

    The model is put in eval mode for tracing and shape propagation; every module's own
    ``training`` flag is restored afterwards. Nothing else is changed (no gradients, no RNG).

    Raises:
        Unsupported: when symbolic tracing or shape propagation fails.
    """
    root = _Root(model, forward_fn)
    aliases: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if name:
            canon = _canonical(f"{_ROOT}.{name}")
            names = aliases.setdefault(id(mod), [])
            if canon not in names:
                names.append(canon)
    param: torch.Tensor | None = next(model.parameters(), None)
    if param is None:
        param = next(model.buffers(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    flags = [(m, m.training) for m in root.modules()]
    # Tracing and shape propagation run the real modules: a buffer they change (a counter,
    # a quantization observer) is put back, as the probe does.
    with preserved_buffers(root):
        try:
            root.eval()
            tracer = _Tracer(aliases)
            try:
                graph = tracer.trace(root)
                gm = fx.GraphModule(root, graph)
            except Exception as exc:
                why = _first_line(exc)
                raise Unsupported(f"torch.fx could not trace the model ({why})") from exc
            x = torch.zeros((1, *input_shape), device=device, dtype=dtype)
            try:
                # ShapeProp prints a traceback for a failing node: the fallback makes it noise.
                with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                    ShapeProp(gm).propagate(x)
            except Exception as exc:
                raise Unsupported(
                    f"shape propagation on the traced graph failed ({_first_line(exc)})"
                ) from exc
        finally:
            for m, flag in flags:
                m.training = flag
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise Unsupported(f"traced graph has {len(placeholders)} inputs, expected 1")
    dependent: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return TracedModel(
        gm, placeholders[0], tracer.outputs, tracer.leaf_paths, dependent, tracer.raw_outputs
    )


def _first_line(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


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
        self._values: dict[fx.Node, bool] = {}

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
    return result


def describe(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """A short name for an op (for messages)."""
    if node.op == "call_module" and gm is not None:
        cls = type(gm.get_submodule(str(node.target)))
        return f"module {cls.__module__}.{cls.__qualname__} ({_canonical(str(node.target))})"
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
            rule = _MODULE_RULES.get(cls)
            if rule is not None:
                break
    elif node.op == "call_function":
        try:
            rule = _FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            rule = None
        if rule is None:
            key = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', '')}"
            rule = _NAMED_FUNCTION_RULES.get(key)
    elif node.op == "call_method":
        rule = _METHOD_RULES.get(str(node.target))
    elif node.op == "get_attr":
        return []
    if rule is None:
        raise Unsupported(f"no receptive-field rule for {describe(node, ctx.gm)}")
    return rule(ctx, node, reg)


# ----------------------------------------------------------------------------- arg helpers


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _ntuple(v: Any, n: int) -> tuple[Any, ...]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1 and n > 1:
            return tuple(v) * n
        return tuple(v)
    return (v,) * n


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _leading(reg: Region, n: int) -> list[Axis]:
    """The first ``n`` axes of a region, unchanged (batch / leading axes)."""
    return [replace(a) for a in reg.axes[:n]]


def broadcast_region(reg: Region, out_shape: Sequence[int], in_shape: Sequence[int]) -> Region:
    """Region of an operand broadcast (right-aligned) to ``out_shape``."""
    off = len(out_shape) - len(in_shape)
    if off < 0:
        raise Unsupported("operand has more dims than the result")
    axes: list[Axis] = []
    for k, n in enumerate(in_shape):
        a = reg.axes[k + off]
        if n == 1 and out_shape[k + off] != 1:
            axes.append(Axis(0, 0, np.ones(1, dtype=bool), a.mixed, a.jump, a.wrap))
            if a.mixed:
                axes[-1].lo = axes[-1].hi = None
        else:
            axes.append(replace(a))
    return Region(axes, reg.local)


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


def _unary(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    """Pointwise in its first argument only (extra args are shapes, dtypes, parameters)."""
    x = _first_input(ctx, node)
    if not ctx.is_tensor_input(x):
        return []
    return [(x, broadcast_region(reg, ctx.shape(node), ctx.shape(x)))]


def _mix_axes(reg: Region, shape: Sequence[int], axes: Iterable[int]) -> Region:
    new = [replace(a) for a in reg.axes]
    for k in axes:
        new[k] = full_axis(shape[k])
    return Region(new, reg.local)


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
    stride_t, dil_t = _ntuple(stride, nd), _ntuple(dilation, nd)
    if isinstance(padding, str):
        if padding == "valid":
            pad_t: tuple[int, ...] = (0,) * nd
        elif padding == "same":
            pad_t = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dil_t))
        else:
            raise Unsupported(f"padding {padding!r}")
    else:
        pad_t = _ntuple(padding, nd)
    lead = len(in_shape) - nd
    axes = _leading(reg, lead)
    if mix_channels:
        axes[-1] = full_axis(in_shape[lead - 1])
    for i in range(nd):
        axes.append(
            window_axis(
                reg.axes[lead + i],
                in_shape[lead + i],
                int(kernel[i]),
                int(stride_t[i]),
                int(pad_t[i]),
                int(dil_t[i]),
                mode,
            )
        )
    return [(x, Region(axes, reg.local and mode == "zeros"))]


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
    st, pt, dt = _ntuple(stride, nd), _ntuple(padding, nd), _ntuple(dilation, nd)
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


def _pool_module(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    m = ctx.gm.get_submodule(str(node.target))
    x = _first_input(ctx, node)
    if getattr(m, "return_indices", False):
        raise Unsupported("pooling with return_indices")
    nd = _spatial_rank(ctx, node)
    kernel = _ntuple(m.kernel_size, nd)
    stride = m.stride if m.stride else kernel
    return _conv_geometry(
        ctx, node, reg, x, kernel, stride, getattr(m, "padding", 0), getattr(m, "dilation", 1),
        mix_channels=False,
    )  # fmt: skip


def _pool_function(nd: int, has_dilation: bool) -> Rule:
    def rule(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
        x = _first_input(ctx, node)
        kernel = _ntuple(_arg(node, 1, "kernel_size"), nd)
        stride = _arg(node, 2, "stride", None) or kernel
        dilation = _arg(node, 4, "dilation", 1) if has_dilation else 1
        if has_dilation and _arg(node, 6, "return_indices", False):
            raise Unsupported("pooling with return_indices")
        return _conv_geometry(
            ctx, node, reg, x, kernel, stride, _arg(node, 3, "padding", 0), dilation,
            mix_channels=False,
        )  # fmt: skip

    return rule


def _adaptive_taps(n: int, o: int) -> Callable[[int], tuple[int, int]]:
    """Adaptive pooling window: ``floor(j*n/o) .. ceil((j+1)*n/o) - 1``."""

    def taps(j: int) -> tuple[int, int]:
        return (j * n) // o, -((-(j + 1) * n) // o) - 1

    return taps


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
    scales: tuple[Any, ...] = (
        _ntuple(scale_factor, nd) if scale_factor is not None else (None,) * nd
    )
    axes = _leading(reg, 2)
    for i in range(nd):
        sf = scales[i]
        scale = Fraction(1) / Fraction(float(sf)) if sf is not None and not recompute else None
        taps, jump = _interp_taps(
            mode, bool(align_corners), in_shape[2 + i], out_shape[2 + i], scale
        )
        axes.append(table_axis(reg.axes[2 + i], in_shape[2 + i], taps, jump))
    return [(x, Region(axes, False))]


def _upsample_module(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    m = ctx.gm.get_submodule(str(node.target))
    assert isinstance(m, nn.Upsample)
    return _interpolate_common(
        ctx, reg, _first_input(ctx, node), ctx.shape(node), m.mode, m.align_corners,
        m.scale_factor, m.recompute_scale_factor,
    )  # fmt: skip


def _interpolate_function(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    if _arg(node, 6, "antialias", False):
        raise Unsupported("interpolate with antialias=True")
    return _interpolate_common(
        ctx, reg, _first_input(ctx, node), ctx.shape(node), _arg(node, 3, "mode", "nearest"),
        _arg(node, 4, "align_corners", None), _arg(node, 2, "scale_factor", None),
        _arg(node, 5, "recompute_scale_factor", None),
    )  # fmt: skip


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
    in_shape = ctx.shape(x)
    nd = len(pads) // 2
    axes = [replace(a) for a in reg.axes]
    for i in range(nd):
        k = len(in_shape) - 1 - i
        left = int(pads[2 * i])
        axes[k] = window_axis(reg.axes[k], in_shape[k], 1, 1, left, 1, mode)
    return [(x, Region(axes, reg.local and mode == "constant"))]


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
        else {_norm_dim(int(d), len(in_shape)) for d in _ntuple(dim, 1)}
    )
    out_shape = shape_of(node)
    keep = out_shape is not None and len(out_shape) == len(in_shape)
    axes: list[Axis] = []
    j = 0
    for k in range(len(in_shape)):
        if k in dims:
            axes.append(full_axis(in_shape[k]))
            if keep:
                j += 1
        else:
            axes.append(replace(reg.axes[j]))
            j += 1
    return [(x, Region(axes, reg.local))]


def _max_min(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    other = _arg(node, 1, "other", None)
    if isinstance(other, fx.Node) and shape_of(other) is not None:
        return _pointwise(ctx, node, reg)  # torch.max(a, b): elementwise
    if _arg(node, 1, "dim", None) is None:
        return _reduction(ctx, node, reg)  # torch.max(x): over everything
    raise Unsupported(f"{describe(node, ctx.gm)} with dim used as a tensor")


def _softmax(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    shape = ctx.shape(x)
    if node.op == "call_module":
        dim = getattr(ctx.gm.get_submodule(str(node.target)), "dim", None)
    else:
        dim = _arg(node, 1, "dim", None)
    if dim is None:
        raise Unsupported("softmax without an explicit dim")
    return [(x, _mix_axes(reg, shape, [_norm_dim(int(dim), len(shape))]))]


def _linear(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    shape = ctx.shape(x)
    return [(x, _mix_axes(reg, shape, [len(shape) - 1]))]


def _layer_norm(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    shape = ctx.shape(x)
    if node.op == "call_module":
        ns = ctx.gm.get_submodule(str(node.target)).normalized_shape
    else:
        ns = _arg(node, 1, "normalized_shape")
    k = len(_ntuple(ns, 1))
    return [(x, _mix_axes(reg, shape, range(len(shape) - k, len(shape))))]


def _group_norm(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    shape = ctx.shape(x)
    return [(x, _mix_axes(reg, shape, range(1, len(shape))))]


def _instance_norm(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    m = ctx.gm.get_submodule(str(node.target))
    if getattr(m, "track_running_stats", False):
        return _unary(ctx, node, reg)  # eval mode: running statistics, pointwise
    x = _first_input(ctx, node)
    shape = ctx.shape(x)
    return [(x, _mix_axes(reg, shape, range(len(shape) - (len(shape) - 2), len(shape))))]


def _channel_mix(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    shape = ctx.shape(x)
    return [(x, _mix_axes(reg, shape, [1 if len(shape) > 1 else 0]))]


def _matmul(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    if b is None:
        b = _arg(node, 1, "mat2")
    out_shape = ctx.shape(node)
    res: list[Contribution] = []
    if ctx.is_tensor_input(a):
        sa = ctx.shape(a)
        if len(sa) < 2 or len(out_shape) < 2:
            raise Unsupported("matmul with a 1-D operand")
        r = broadcast_region(Region(reg.axes[:-1], reg.local), out_shape[:-1], sa[:-1])
        res.append((a, Region([*r.axes, full_axis(sa[-1])], reg.local)))
    if ctx.is_tensor_input(b):
        sb = ctx.shape(b)
        if len(sb) < 2 or len(out_shape) < 2:
            raise Unsupported("matmul with a 1-D operand")
        lead = Region(reg.axes[:-2], reg.local)
        r = broadcast_region(lead, out_shape[:-2], sb[:-2])
        res.append((b, Region([*r.axes, full_axis(sb[-2]), replace(reg.axes[-1])], reg.local)))
    return res


def _sdpa(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    q, k, v = _arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value")
    out_shape = ctx.shape(node)
    res: list[Contribution] = []
    lead = Region(reg.axes[:-2], reg.local)
    for t, keep_rows, keep_cols in ((q, True, False), (k, False, False), (v, False, True)):
        if not ctx.is_tensor_input(t):
            continue
        s = ctx.shape(t)
        r = broadcast_region(lead, out_shape[:-2], s[:-2])
        rows = replace(reg.axes[-2]) if keep_rows else full_axis(s[-2])
        cols = replace(reg.axes[-1]) if keep_cols else full_axis(s[-1])
        res.append((t, Region([*r.axes, rows, cols], reg.local)))
    return res


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
                lo, hi = max(_int(ax.lo), off), min(_int(ax.hi), off + n - 1)
                if lo > hi and not mask.any():
                    off += n
                    continue
                part = Axis(lo - off, hi - off, mask, False, ax.jump, ax.wrap)
            axes = [replace(a) for a in reg.axes]
            axes[dim] = part
            local = reg.local and (n == out_shape[dim] or dim < 2)
            res.append((t, Region(axes, local)))
        off += n
    return res


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


def _reshape_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Split two shapes of equal numel into groups of axes with equal products."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        gi: list[int] = []
        gj: list[int] = []
        pa = pb = 1
        if i < len(a):
            gi.append(i)
            pa *= a[i]
            i += 1
        if j < len(b):
            gj.append(j)
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i)
                pa *= a[i]
                i += 1
            elif j < len(b):
                gj.append(j)
                pb *= b[j]
                j += 1
            else:
                raise Unsupported("reshape between shapes of different sizes")
        groups.append((gi, gj))
    return groups


def reshape_region(reg: Region, in_shape: Sequence[int], out_shape: Sequence[int]) -> Region:
    """Region of the input of a reshape (view/flatten/squeeze/...) from its output's."""
    axes: list[Axis] = [full_axis(1)] * len(in_shape)
    local = reg.local
    for gi, gj in _reshape_groups(in_shape, out_shape):
        big_i = [k for k in gi if in_shape[k] > 1]
        big_j = [k for k in gj if out_shape[k] > 1]
        if len(gi) == 1 and len(gj) == 1:
            axes[gi[0]] = replace(reg.axes[gj[0]])
            continue
        if len(big_i) <= 1 and len(big_j) <= 1 and len(big_i) == len(big_j):
            # only size-1 axes added/removed: the big axis maps one to one
            for k in gi:
                axes[k] = (
                    replace(reg.axes[big_j[0]]) if big_i and k == big_i[0] else point_axis(1, 0)
                )
                if not big_i:
                    axes[k].mixed = any(reg.axes[m].mixed for m in gj)
                    if axes[k].mixed:
                        axes[k].lo = axes[k].hi = None
            continue
        local = False
        mixed = any(reg.axes[k].mixed for k in gj)
        if all(reg.axes[k].mask.all() for k in gj):
            masks = [np.ones(in_shape[k], dtype=bool) for k in gi]
        else:
            grids = np.meshgrid(*[np.flatnonzero(reg.axes[k].mask) for k in gj], indexing="ij")
            flat = np.ravel_multi_index(
                [g.ravel() for g in grids], [out_shape[k] for k in gj]
            )  # fmt: skip
            coords = np.unravel_index(flat, [in_shape[k] for k in gi])
            masks = [_mask_from(c.astype(np.int64), in_shape[k]) for c, k in zip(coords, gi)]
        for k, m in zip(gi, masks):
            # A mixed axis that lands on part of an input axis (a Swin window merged back
            # into its image axis) is a finite, in-bounds window there: not global.
            if mixed and m.all():
                axes[k] = Axis(None, None, m, True, None)
            else:
                nz = np.flatnonzero(m)
                lo, hi = (int(nz[0]), int(nz[-1])) if nz.size else (0, -1)
                axes[k] = Axis(lo, hi, m, False, None, any(reg.axes[j].wrap for j in gj))
    return Region(axes, local)


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
        src = [_norm_dim(int(d), ndim) for d in _ntuple(_arg(node, 1, "source"), 1)]
        dst = [_norm_dim(int(d), ndim) for d in _ntuple(_arg(node, 2, "destination"), 1)]
        order = [d for d in range(ndim) if d not in src]
        perm = [-1] * ndim
        for s, d in zip(src, dst):
            perm[d] = s
        it = iter(order)
        return [p if p >= 0 else next(it) for p in perm]
    raise Unsupported(f"axis permutation {name!r}")


def _permute(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    x = _first_input(ctx, node)
    ndim = len(ctx.shape(x))
    perm = _permutation(ctx, node, ndim)
    axes: list[Axis] = [full_axis(1)] * ndim
    for k, src in enumerate(perm):
        axes[src] = replace(reg.axes[k])
    return [(x, Region(axes, reg.local))]


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
    return [(x, Region(axes, local))]


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
        if name == "unbind":
            axes = [replace(a) for a in reg.axes]
            axes.insert(d, point_axis(in_shape[d], index))
            return [(x, Region(axes, reg.local and d < 2))]
        sizes = [int(m.shape[d]) for m in meta]
        off = sum(sizes[:index])
        ax = reg.axes[d]
        axes = [replace(a) for a in reg.axes]
        axes[d] = window_axis(ax, in_shape[d], 1, 1, -off, 1)
        return [(x, Region(axes, reg.local and d < 2))]
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


def _mha_module(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    return _everything_mixed(ctx, node, reg)


def _transformer_module(ctx: _Ctx, node: fx.Node, reg: Region) -> list[Contribution]:
    """``nn.TransformerEncoderLayer`` & co. (fx leaves): attention within each sample."""
    mod = ctx.gm.get_submodule(str(node.target))
    first = next((m for m in mod.modules() if isinstance(m, nn.MultiheadAttention)), None)
    if first is None:
        return _everything_mixed(ctx, node, reg)
    return _sequence_mixer(ctx, node, reg, 0 if first.batch_first else 1)


# ----------------------------------------------------------------------------- tables


def _words(text: str) -> list[str]:
    return text.split()


_POINTWISE_NAMES = _words(
    """
    add sub mul div truediv floordiv true_divide rsub neg pos abs exp log log1p expm1 sqrt
    rsqrt pow square reciprocal sign sin cos tanh sigmoid relu relu6 relu_ leaky_relu
    leaky_relu_ elu elu_ selu celu gelu silu mish hardswish hardsigmoid hardtanh hardtanh_
    softplus softsign tanhshrink logsigmoid threshold prelu rrelu clamp clamp_ clamp_min
    clamp_max clip where maximum minimum fmax fmin lerp addcmul addcdiv masked_fill dropout
    dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout contiguous clone
    detach float double half bfloat16 to type type_as add_ sub_ mul_ div_ sigmoid_ tanh_
    exp_ neg_ abs_ sqrt_ pow_ fill_ zero_ iadd isub imul itruediv
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

_MODULE_RULES: dict[type, Rule] = {}
_FUNCTION_RULES: dict[Any, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}
#: Functions of optional packages, by ``module.name`` (no import needed). Functions that
#: torch.fx keeps as one call (``torch.fx.wrap``) land here.
_NAMED_FUNCTION_RULES: dict[str, Rule] = {}


def _register_module(rule: Rule, *classes: type) -> None:
    for cls in classes:
        _MODULE_RULES[cls] = rule


def _register_function(rule: Rule, *names: str, namespaces: Sequence[Any] = ()) -> None:
    spaces = namespaces or (torch, F, operator, torch.Tensor, torch.special)
    for name in names:
        for ns in spaces:
            fn = getattr(ns, name, None)
            if fn is not None and callable(fn):
                with contextlib.suppress(TypeError):
                    _FUNCTION_RULES[fn] = rule


def _register_method(rule: Rule, *names: str) -> None:
    for name in names:
        _METHOD_RULES[name] = rule


def _build_tables() -> None:
    m = nn
    _register_module(
        _unary,
        m.Identity, m.Dropout, m.Dropout1d, m.Dropout2d, m.Dropout3d, m.AlphaDropout,
        m.FeatureAlphaDropout, m.ReLU, m.ReLU6, m.LeakyReLU, m.PReLU, m.RReLU, m.ELU, m.SELU,
        m.CELU, m.GELU, m.SiLU, m.Mish, m.Hardswish, m.Hardsigmoid, m.Hardtanh, m.Sigmoid,
        m.Tanh, m.Softplus, m.Softsign, m.Tanhshrink, m.LogSigmoid, m.Threshold,
        m.Hardshrink, m.Softshrink,
        m.modules.batchnorm._BatchNorm,
    )  # fmt: skip
    _register_module(_conv_module, m.modules.conv._ConvNd)
    _register_module(
        _pool_module, m.MaxPool1d, m.MaxPool2d, m.MaxPool3d, m.AvgPool1d, m.AvgPool2d,
        m.AvgPool3d, m.modules.pooling._LPPoolNd,
    )  # fmt: skip
    _register_module(
        _adaptive, m.AdaptiveAvgPool1d, m.AdaptiveAvgPool2d, m.AdaptiveAvgPool3d,
        m.AdaptiveMaxPool1d, m.AdaptiveMaxPool2d, m.AdaptiveMaxPool3d,
    )  # fmt: skip
    _register_module(_upsample_module, m.Upsample)
    _register_module(_pixel_shuffle, m.PixelShuffle, m.PixelUnshuffle)
    _register_module(_pad, m.modules.padding._ConstantPadNd, m.modules.padding._ReflectionPadNd,
                     m.modules.padding._ReplicationPadNd)  # fmt: skip
    circular = getattr(m.modules.padding, "_CircularPadNd", None)
    if circular is not None:
        _register_module(_pad, circular)
    _register_module(_reshape, m.Flatten, m.Unflatten)
    _register_module(_softmax, m.Softmax, m.LogSoftmax, m.Softmin)
    _register_module(_channel_mix, m.Softmax2d, m.LocalResponseNorm, m.ChannelShuffle)
    _register_module(_linear, m.Linear)
    _register_module(_layer_norm, m.LayerNorm)
    rms = getattr(m, "RMSNorm", None)
    if rms is not None:
        _register_module(_layer_norm, rms)
    _register_module(_group_norm, m.GroupNorm)
    _register_module(_instance_norm, m.modules.instancenorm._InstanceNorm)
    _register_module(_mha_module, m.MultiheadAttention)
    _register_module(
        _transformer_module, m.TransformerEncoderLayer, m.TransformerDecoderLayer,
        m.TransformerEncoder, m.TransformerDecoder, m.Transformer,
    )  # fmt: skip

    _register_function(_pointwise, *_POINTWISE_NAMES)
    _register_function(_unary, *_UNARY_NAMES)
    _register_function(_conv_function, "conv1d", "conv2d", "conv3d")
    _register_function(
        _conv_transpose_function, "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"
    )
    for nd in (1, 2, 3):
        _register_function(
            _pool_function(nd, True), f"max_pool{nd}d", f"_max_pool{nd}d",
            namespaces=(F, torch),
        )  # fmt: skip
        _register_function(_pool_function(nd, False), f"avg_pool{nd}d", namespaces=(F, torch))
        _register_function(
            _adaptive, f"adaptive_avg_pool{nd}d", f"adaptive_max_pool{nd}d",
            f"_adaptive_max_pool{nd}d", namespaces=(F, torch),
        )  # fmt: skip
    _register_function(_interpolate_function, "interpolate", "upsample", namespaces=(F,))
    _register_function(_pixel_shuffle, "pixel_shuffle", "pixel_unshuffle", namespaces=(F, torch))
    _register_function(_pad, "pad", namespaces=(F,))
    _register_function(_reduction, *_REDUCTION_NAMES, namespaces=(torch,))
    _register_function(_softmax, "softmax", "log_softmax", "softmin", namespaces=(torch, F))
    _register_function(_linear, "linear", namespaces=(F, torch.nn.functional))
    _register_function(_layer_norm, "layer_norm", "rms_norm", namespaces=(F,))
    _register_function(_group_norm, "group_norm", namespaces=(F,))
    _register_function(_matmul, "matmul", "bmm", "mm", namespaces=(torch, operator))
    _register_function(_sdpa, "scaled_dot_product_attention", namespaces=(F,))
    _register_function(_cat, "cat", "concat", "concatenate", namespaces=(torch,))
    _register_function(_stack, "stack", namespaces=(torch,))
    _register_function(_reshape, *_RESHAPE_NAMES, namespaces=(torch,))
    _register_function(_permute, *_PERMUTE_NAMES, namespaces=(torch,))
    _FUNCTION_RULES[operator.getitem] = _getitem

    _register_method(_pointwise, *_POINTWISE_NAMES)
    _register_method(_unary, *_UNARY_NAMES)
    _register_method(_reduction, *_REDUCTION_NAMES)
    _register_method(_softmax, "softmax", "log_softmax")
    _register_method(_matmul, "matmul", "bmm", "mm", "__matmul__")
    _register_method(_reshape, *_RESHAPE_NAMES)
    _register_method(_permute, *_PERMUTE_NAMES)
    _register_method(_expand, "expand", "expand_as", "broadcast_to")
    _register_function(_expand, "broadcast_to", namespaces=(torch,))
    _register_function(_max_min, "max", "min", namespaces=(torch,))
    # torchvision: stochastic depth is the identity in eval mode (per-sample scaling otherwise).
    _NAMED_FUNCTION_RULES["torchvision.ops.stochastic_depth.stochastic_depth"] = _unary
    # Data-dependent sampling (torch and torchvision; torchvision's functions by name).
    grid = _sampling("grid_sample", (1, "grid"))
    _register_function(grid, "grid_sample", namespaces=(F,))
    _register_function(grid, "grid_sampler", "grid_sampler_2d", "grid_sampler_3d",
                       namespaces=(torch,))  # fmt: skip
    _NAMED_FUNCTION_RULES["torchvision.ops.deform_conv.deform_conv2d"] = _sampling(
        "deform_conv2d", (1, "offset"), (7, "mask")
    )
    for op, module in (
        ("roi_align", "roi_align"), ("roi_pool", "roi_pool"),
        ("ps_roi_align", "ps_roi_align"), ("ps_roi_pool", "ps_roi_pool"),
    ):  # fmt: skip
        _NAMED_FUNCTION_RULES[f"torchvision.ops.{module}.{op}"] = _sampling(op, (1, "boxes"))
    _NAMED_FUNCTION_RULES["torchvision.ops.poolers._multiscale_roi_align"] = _sampling(
        "MultiScaleRoIAlign", (1, "boxes")
    )
    _register_method(_max_min, "max", "min")


_build_tables()
