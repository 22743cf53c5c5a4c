"""Symbolic tracing with concrete values: a torch.fx graph of what the input's values feed.

Plain :mod:`torch.fx` stops at the first Python decision a model takes about a tensor's size
(``if H % window``, ``len(x)``, ``B, H, W, C = x.shape`` passed on to a helper that branches
on it): every Hugging Face vision model, torchvision's Swin (its fx-wrapped window attention
is opaque) and timm's. This tracer runs the model on a zeros batch of one *while* it traces,
so every proxy carries its concrete value:

* sizes, dtypes, devices and everything computed from them or from parameters only (shifted
  window masks built from sizes, relative position biases gathered from a table) are plain
  Python values and constant tensors, for the traced input shape;
* only what the input's *values* feed is recorded as graph nodes, each with its shape
  (``node.meta["tensor_meta"]``, as :class:`~torch.fx.passes.shape_prop.ShapeProp` writes
  it); constants enter the graph as ``get_attr`` nodes;
* functions wrapped with ``torch.fx.wrap`` that have no receptive-field rule are traced
  into (they are wrapped because plain fx cannot follow their size arithmetic); one that
  still cannot be traced stays a single call.

Control flow that depends on the input's values cannot be traced (:class:`Unsupported`).

A Python loop over the input's tokens (a selective scan written as ``for i in range(L)``) is
unrolled: every op of every step is a graph node, dozens of forwards' worth of tracing. So the
trace stops once one op at one module has been recorded more than :data:`LOOP_BOUND` times
plus once per module inside that module (a loop over its own blocks repeats an op once per
block; the test zoo's models repeat one op at one module at most 8 times): :class:`Unrolled`
then holds the graph up to there, and names the op. :func:`full_trace` lifts the bound.

The values the input feeds are those of a zeros image: nothing but their shapes and dtypes
is ever read (a decision on them is refused, and they are dropped after tracing). So the
common leaf modules whose output shape is known without running them (linear, convolution,
normalisation and activation layers: :func:`output_like`) return a stand-in of that shape
(zeros, or their input where the shape is unchanged) instead of computing it, which takes
most of the trace's batch-1 forward off a fresh call's cost.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import io
import operator
import threading
import types
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from erf_monitor.core.buffers import preserved_buffers, preserved_training
from erf_monitor.core.devices import model_device_dtype
from erf_monitor.core.index import ModelIndex, index_of
from erf_monitor.core.probing import StopForward, probing

__all__ = [
    "LOOP_BOUND",
    "ROOT",
    "TracedGraph",
    "TracedModel",
    "Unrolled",
    "Unsupported",
    "canonical",
    "full_trace",
    "trace_model",
]

ROOT = "model"

#: Times one op at one module may be recorded, beyond one per module inside that module,
#: before the trace counts as unrolling a loop and stops (the test zoo: at most 8).
LOOP_BOUND = 64
_BOUND: contextvars.ContextVar[int | None] = contextvars.ContextVar("loop_bound", default=None)


@contextlib.contextmanager
def full_trace() -> Iterator[None]:
    """Traces inside record the whole forward, however often a loop repeats an op."""
    token = _BOUND.set(-1)
    try:
        yield
    finally:
        _BOUND.reset(token)


class Unsupported(Exception):
    """The fx analysis cannot follow this model (tracing failed or an op has no rule)."""


class Unrolled(Unsupported):
    """The trace stopped at a Python loop (:data:`LOOP_BOUND`): ``traced`` is the graph up to
    there (every module that returned before has its output node), ``site`` names the op that
    repeats and where."""

    def __init__(self, site: str, traced: TracedModel) -> None:
        super().__init__(f"the trace stopped at a Python loop: {site}")
        self.site = site
        self.traced = traced


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


def canonical(path: str) -> str:
    """A module path of the traced root as the user's model names it."""
    parts = path.split(".")
    if parts and parts[0] == ROOT:
        parts = parts[1:]
    return ".".join(p for p in parts if p != "_orig_mod")


#: Tensor attributes that describe a tensor without reading its values.
_META_ATTRS = frozenset(
    [
        "shape", "dtype", "device", "ndim", "is_cuda", "is_sparse", "is_quantized", "is_meta",
        "is_mps", "layout", "requires_grad", "is_leaf",
    ]
)  # fmt: skip
#: Methods and functions whose result reads only the size/dtype/device of their first
#: argument (other arguments count as usual).
_META_METHODS = frozenset(
    [
        "size", "dim", "numel", "nelement", "ndimension", "get_device", "is_floating_point",
        "is_complex", "is_contiguous", "element_size", "stride", "new_zeros", "new_ones",
        "new_empty", "new_full", "new_tensor",
    ]
)  # fmt: skip
_META_FUNCTIONS: frozenset[Any] = frozenset(
    [
        torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.numel,
        torch.is_floating_point, torch.is_complex, torch.is_tensor, len,
    ]
)  # fmt: skip


class _Proxy(fx.Proxy):
    """A proxy that answers size questions (``x.shape``, ``len(x)``) with concrete values.

    The tracer keeps a node's value while a proxy of it lives (like the forward it mirrors,
    which frees a tensor nobody refers to any more).
    """

    @property
    def node(self) -> fx.Node:
        return self.__dict__["_node"]

    @node.setter
    def node(self, node: fx.Node) -> None:
        old = self.__dict__.get("_node")
        self.__dict__["_node"] = node
        tracer = self.__dict__.get("tracer")
        if isinstance(tracer, ConcreteTracer):
            tracer.retain(node)
            if old is not None:
                tracer.release(old)

    def __del__(self) -> None:
        tracer, node = self.__dict__.get("tracer"), self.__dict__.get("_node")
        if isinstance(tracer, ConcreteTracer) and node is not None:
            tracer.release(node)

    def __getattr__(self, k: str) -> Any:
        value = self.tracer.values.get(self.node)  # type: ignore[attr-defined]
        if isinstance(value, torch.Tensor) and k in _META_ATTRS:
            return getattr(value, k)
        return super().__getattr__(k)

    def __len__(self) -> int:
        return len(self.tracer.values[self.node])  # type: ignore[attr-defined]


def _has_proxy(a: Any) -> bool:
    if isinstance(a, fx.Proxy):
        return True
    if isinstance(a, (tuple, list)):
        return any(_has_proxy(v) for v in a)
    if isinstance(a, dict):
        return any(_has_proxy(v) for v in a.values())
    if isinstance(a, slice):
        return _has_proxy((a.start, a.stop, a.step))
    return False


def _record_meta(node: fx.Node, value: Any) -> None:
    """``tensor_meta`` (shape, dtype, stride) and ``type`` of a node, as ShapeProp records
    them (without memory-format and quantization details, which the walk never reads)."""
    found = False

    def extract(obj: Any) -> Any:
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            return TensorMetadata(
                obj.shape, obj.dtype, obj.requires_grad, obj.stride(), None, False, {}
            )
        return obj

    meta = fx.node.map_aggregate(value, extract)
    if found:
        node.meta["tensor_meta"] = meta
    node.meta["type"] = type(value)


class _FailedInline(Exception):
    pass


class ConcreteTracer(fx.Tracer):
    """fx tracer whose proxies carry concrete values (see the module docstring).

    Also records the output node of the first call of every module (containers included),
    by every name the module has (``aliases``).
    """

    def __init__(
        self,
        aliases: dict[int, list[str]],
        example: torch.Tensor,
        keep_function: Callable[[Any], bool],
        stop_after: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(autowrap_functions=_autowrap_functions())
        self.aliases = aliases
        self.stop_after = stop_after
        self.example = example
        self.keep_function = keep_function
        self.values: dict[fx.Node, Any] = {}
        self.outputs: dict[str, fx.Node | None] = {}
        self.raw_outputs: dict[str, Any] = {}  # what the call returned (nodes in containers)
        self.leaf_paths: set[str] = set()
        self._running = 0  # > 0 while a value is computed (module calls then record nothing)
        self._attr_names: dict[int, str] | None = None
        self._refs: dict[fx.Node, int] = {}  # live proxies per node
        self._called: dict[str, nn.Module] = {}  # path -> module, of the modules called
        bound = _BOUND.get()
        self.bound = LOOP_BOUND if bound is None else None if bound < 0 else bound
        self.unrolled: str | None = None  # the op that repeated past the bound, and where
        self._repeats: dict[tuple[str, str, Any], int] = {}
        self._sizes: dict[str, int] = {}  # scope path -> modules inside it (itself included)
        # fx patches nn.Module.__call__ for every thread while it traces: only this thread's
        # module calls are traced (another thread running the model meanwhile is not).
        self._thread = threading.get_ident()

    def retain(self, node: fx.Node) -> None:
        self._refs[node] = self._refs.get(node, 0) + 1

    def release(self, node: fx.Node) -> None:
        count = self._refs.get(node, 0) - 1
        if count > 0:
            self._refs[node] = count
        else:  # no proxy of it is left: nothing can read its value any more
            self._refs.pop(node, None)
            self.values.pop(node, None)

    # -- proxies carry values

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        return attr_val  # parameters are constants: what they compute is folded

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            # A parameter or buffer of the model: found by identity in one table (fx would
            # search every named parameter and buffer, for every argument).
            if self._attr_names is None:
                named = [*self.root.named_parameters(), *self.root.named_buffers()]
                self._attr_names = {id(t): name for name, t in named}
            name = self._attr_names.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def create_node(
        self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **kw: Any
    ) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, *rest, **kw)
        if kind == "get_attr":
            value: Any = self.root
            for part in str(target).split("."):
                value = getattr(value, part)
            _record_meta(node, value)
        return node

    def create_proxy(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any | None = None,
        proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None,
    ) -> Any:
        if kind not in ("call_function", "call_method", "call_module"):
            proxy = super().create_proxy(
                kind, target, args, kwargs, name, type_expr, proxy_factory_fn
            )
            if kind == "placeholder":
                self.values[proxy.node] = self.example
                _record_meta(proxy.node, self.example)
            return proxy
        if not self._reads_values(kind, target, args, kwargs):
            # Sizes and constants: computed now, a plain value for the rest of the trace.
            return self._run(kind, target, self._concrete(args), self._concrete(kwargs))
        if kind == "call_function" and self._inlinable(target):
            with contextlib.suppress(_FailedInline):
                return self._inline(target, args, kwargs)
        in_place = _in_place(kind, target)
        if in_place and not (args and isinstance(args[0], fx.Proxy)):
            raise fx.proxy.TraceError(
                "the forward writes values computed from the input into a tensor it built "
                f"({_op_name_of(kind, target)}, in place)"
            )
        if target is operator.setitem:
            raise fx.proxy.TraceError("the forward assigns into a tensor (x[...] = ...)")
        if kind != "call_module":  # (module calls are counted where they are called)
            self._count(kind, target)
        value = self._run(kind, target, self._concrete(args), self._concrete(kwargs), True)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self.values[proxy.node] = value
        _record_meta(proxy.node, value)
        if target is getattr:
            self.retain(proxy.node)  # an Attribute (``x.T``) keeps the node, not this proxy
        if in_place:
            # Later uses of the mutated proxy read the op's result (``x.add_(y)``, then ``x``).
            args[0].node = proxy.node
        return proxy

    def _reads_values(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: Any) -> bool:
        meta_only = (kind == "call_method" and target in _META_METHODS) or (
            kind == "call_function" and _hashable_in(target, _META_FUNCTIONS)
        )
        if kind == "call_method" and target == "type" and (len(args) == 1 and not kwargs):
            meta_only = True
        return _has_proxy((args[1:] if meta_only else args, kwargs))

    def _concrete(self, a: Any) -> Any:
        if isinstance(a, fx.Proxy):
            return self.values[a.node]
        if isinstance(a, tuple):
            return tuple(self._concrete(v) for v in a)
        if isinstance(a, list):
            return [self._concrete(v) for v in a]
        if isinstance(a, dict):
            return {k: self._concrete(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(self._concrete(a.start), self._concrete(a.stop), self._concrete(a.step))
        return a

    def _run(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        of_input: bool = False,
    ) -> Any:
        self._running += 1
        try:
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            module = self._called.get(target)
            if module is None:
                module = self.root.get_submodule(target)
            if of_input:  # the input's own values: only their shapes are ever read
                out = output_like(module, args, kwargs)
                if out is not None:
                    return out
            return module(*args, **kwargs)
        finally:
            self._running -= 1

    def _inlinable(self, target: Any) -> bool:
        """A Python function (an fx-wrapped helper) outside torch, without a rule of its own."""
        return (
            isinstance(target, types.FunctionType)
            and (target.__module__ or "").split(".")[0] != "torch"
            and not self.keep_function(target)
        )

    def _inline(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            out = target(*args, **kwargs)
        except Exception as exc:
            raise _FailedInline from exc
        if not isinstance(out, fx.Proxy):
            raise _FailedInline
        return out

    def _count(self, kind: str, target: Any) -> None:
        """Stop the trace (:class:`Unrolled`) once one op at the current module has been
        recorded more than the bound plus once per module inside this one."""
        if self.bound is None:
            return
        path = self.scope.module_path
        key = (path, kind, id(target) if kind == "call_function" else target)
        count = self._repeats.get(key, 0) + 1
        self._repeats[key] = count
        if count <= self.bound:
            return
        size = self._sizes.get(path)
        if size is None:
            size = self._sizes[path] = sum(1 for _ in self.root.get_submodule(path).modules())
        if count > self.bound + size:
            self.unrolled = f"{self._site(kind, target, path)} recorded {count} times"
            raise StopForward

    def _site(self, kind: str, target: Any, path: str) -> str:
        """An op and the module it runs in, for messages ("getitem in '1' (Scan)")."""
        op = f"module {canonical(target)!r}" if kind == "call_module" else _op_name_of(kind, target)
        name = canonical(path)
        if not name:
            return f"{op} in the model's forward"
        return f"{op} in {name!r} ({type(self.root.get_submodule(path)).__name__})"

    # -- Python decisions about proxies

    def to_bool(self, obj: fx.Proxy) -> bool:
        raise fx.proxy.TraceError(
            "the forward takes a Python decision on the input's values "
            f"({_op_name(obj.node)} used in control flow)"
        )

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        value = self.values[obj.node]
        if isinstance(value, dict):
            return iter(value)
        items: Any = obj
        return iter([items[i] for i in range(len(value))])

    def keys(self, obj: fx.Proxy) -> Any:
        value = self.values[obj.node]
        return value.keys() if isinstance(value, dict) else super().keys(obj)

    # -- module calls

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        if not _has_proxy((args, kwargs)):
            # A constant computation (or a value being run): no node of the input.
            if not self._running:
                for name in self.aliases.get(id(m), []):
                    self.outputs.setdefault(name, None)
            return forward(*args, **kwargs)
        inner = getattr(m, "_orig_mod", None)
        if isinstance(inner, nn.Module) and type(m).__name__ == "OptimizedModule":
            # A torch.compile'd submodule: fx cannot trace dynamo frames, so trace the eager
            # module it wraps (same canonical name, same function).
            return self.call_module(inner, inner.forward, args, kwargs)
        path = self.path_of_module(m)
        self._count("call_module", path)
        self._called[path] = m  # for _run: no second lookup of the module by its path
        out = super().call_module(m, forward, args, kwargs)
        node = out.node if isinstance(out, fx.Proxy) else None
        for name in self.aliases.get(id(m), [canonical(path)]):
            self.outputs.setdefault(name, node)
            if name not in self.raw_outputs:
                self.raw_outputs[name] = _as_nodes(out)  # structure only: no value kept alive
        if self.is_leaf_module(m, path):
            self.leaf_paths.add(canonical(path))
        if self.stop_after and not self._running and self.stop_after <= self.outputs.keys():
            raise StopForward  # every layer analysed has its node: nothing later is needed
        return out


_CONVS: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_NORMS: dict[type[nn.Module], int] = {nn.BatchNorm1d: 0, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}
#: Leaf modules that return a tensor of their input's shape (exact types: a subclass may
#: override ``forward``).
_SAME_SHAPE: frozenset[type[nn.Module]] = frozenset(
    [
        nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.ReLU, nn.ReLU6,
        nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
        nn.ELU, nn.Mish, nn.Softplus,
    ]
)  # fmt: skip


def output_like(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A tensor shaped like what ``module`` returns for ``args`` (zeros, or the input where
    the shape is the same), or ``None``: run it.

    Only for exact types whose output shape follows from the input's and when the call
    cannot fail (channels, features and dtypes match, the output is not empty): otherwise the
    real module runs and raises its own error.
    """
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    x, kind = args[0], type(module)
    if x.layout != torch.strided or not x.is_floating_point() or x.ndim == 0:
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None  # the real output's dtype is autocast's choice
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and (weight.dtype, weight.device) != (x.dtype, x.device):
        return None
    shape: tuple[int, ...] | None = None
    if kind in _SAME_SHAPE:
        shape = tuple(x.shape)
    elif kind is nn.Linear:
        if x.shape[-1] == module.in_features:
            shape = (*x.shape[:-1], int(module.out_features))  # type: ignore[arg-type]
    elif kind is nn.LayerNorm:
        normalized = tuple(module.normalized_shape)  # type: ignore[arg-type]
        if tuple(x.shape[x.ndim - len(normalized) :]) == normalized:
            shape = tuple(x.shape)
    elif kind is nn.GroupNorm:
        if x.ndim >= 2 and x.shape[1] == module.num_channels:
            shape = tuple(x.shape)
    elif kind in _NORMS:
        dims = _NORMS[kind]
        ok_dims = x.ndim in (2, 3) if dims == 0 else x.ndim == dims
        batch_stats = module.training or module.running_mean is None
        if ok_dims and x.shape[1] == module.num_features and not batch_stats:
            shape = tuple(x.shape)
    elif kind in _CONVS:
        shape = _conv_shape(module, x, _CONVS[kind])  # type: ignore[arg-type]
    if shape is None or 0 in shape:
        return None
    # Its values are never read: the input itself where the shape is the same.
    return x if shape == tuple(x.shape) else x.new_zeros(shape)


def _conv_shape(m: nn.Conv1d, x: torch.Tensor, nd: int) -> tuple[int, ...] | None:
    if x.ndim != nd + 2 or x.shape[1] != m.in_channels:
        return None  # unbatched or wrong channels: the real call says what happens
    sizes = []
    for i in range(nd):
        size, k, s, d = int(x.shape[2 + i]), m.kernel_size[i], m.stride[i], m.dilation[i]
        if m.padding == "same":  # the output keeps the size; the larger side is padded:
            pad = d * (k - 1) - d * (k - 1) // 2
        else:
            pad = 0 if m.padding == "valid" else int(m.padding[i])
        if m.padding_mode != "zeros" and pad >= size:
            return None  # reflect / circular padding as wide as the input: let torch say
        if m.padding == "same":
            sizes.append(size)
            continue
        span = size + 2 * pad - d * (k - 1) - 1
        if span < 0:
            return None
        sizes.append(span // s + 1)
    return (int(x.shape[0]), int(m.out_channels), *sizes)


def _in_place(kind: str, target: Any) -> bool:
    """An op that changes its first argument (``x.add_(y)``, ``x += y``, ``torch.relu_``)."""
    name = str(target) if kind == "call_method" else getattr(target, "__name__", "")
    if name == "__setitem__" or (name.startswith("__i") and name.endswith("__")):
        return True  # x[...] = v, __iadd__ & co.
    if kind == "call_function" and target in _IN_PLACE_OPERATORS:
        return True
    return name.endswith("_") and not name.startswith("_")


_IN_PLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul,
}  # fmt: skip


def _op_name_of(kind: str, target: Any) -> str:
    if kind == "call_method":
        return f"Tensor.{target}"
    return getattr(target, "__name__", None) or str(target)


def _as_nodes(out: Any) -> Any:
    """``out`` with every proxy replaced by its node (containers keep their type if they can)."""
    if isinstance(out, fx.Proxy):
        return out.node
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(_as_nodes(v) for v in out))
    if isinstance(out, (tuple, list)):
        return type(out)(_as_nodes(v) for v in out)
    if isinstance(out, dict):
        try:
            new = copy.copy(out)  # a ModelOutput stays one (selectors index it by position)
            for key in list(out.keys()):
                new[key] = _as_nodes(out[key])
        except Exception:
            return {key: _as_nodes(v) for key, v in out.items()}
        return new
    return out


def _hashable_in(target: Any, table: frozenset[Any]) -> bool:
    try:
        return target in table
    except TypeError:
        return False


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", None) or str(node.target)


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


class TracedGraph:
    """The traced graph and the module its ``get_attr`` and ``call_module`` targets name: what
    the walk reads of an ``fx.GraphModule``, without generating and compiling its code."""

    def __init__(self, root: nn.Module, graph: fx.Graph) -> None:
        self.root = root
        self.graph = graph
        self._modules: dict[str, nn.Module] = {}

    def get_submodule(self, target: str) -> nn.Module:
        module = self._modules.get(target)
        if module is None:
            module = self._modules[target] = self.root.get_submodule(target)
        return module


@dataclass
class TracedModel:
    """A traced model with concrete shapes, ready for the receptive-field walk."""

    gm: TracedGraph
    placeholder: fx.Node
    outputs: dict[str, fx.Node | None]  # canonical layer name -> output node of first call
    leaf_paths: set[str]
    dependent: set[fx.Node] = field(default_factory=set)  # nodes that depend on the input
    raw_outputs: dict[str, Any] = field(default_factory=dict)  # for output selectors
    memo: dict[str, Any] = field(default_factory=dict)  # analyses shared by every walk

    def constant(self, node: fx.Node) -> Any:
        """The value of a ``get_attr`` node (a parameter, buffer or folded constant)."""
        value: Any = self.gm.root
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value


def trace_model(
    model: nn.Module,
    forward_fn: Callable[[nn.Module, torch.Tensor], Any] | None,
    input_shape: Sequence[int],
    keep_function: Callable[[Any], bool] = lambda _fn: False,
    stop_after: Collection[str] = (),
    index: ModelIndex | None = None,
) -> TracedModel:
    """Trace ``model`` on a batch-1 zeros input of ``input_shape`` (see the module docstring).

    ``stop_after``: module names (as the model names them); tracing stops once each has
    returned, as the probe's forward does (the graph then ends there).

    The model is put in eval mode for tracing; every module's own ``training`` flag and every
    buffer are restored afterwards. Nothing else is changed (no gradients, no RNG).
    ``keep_function(fn)`` says which fx-wrapped functions stay one call (those with a rule).

    ``index``: ``model``'s index, when the caller took it already (read, not walked again).

    Raises:
        Unrolled: the trace stopped at a Python loop (:data:`LOOP_BOUND`; it holds the graph
            up to there).
        Unsupported: when tracing fails (the message names the reason).
    """
    root = _Root(model, forward_fn)
    index = index_of(model) if index is None or index.model is not model else index
    aliases: dict[int, list[str]] = {}
    for name, mod in index.paths:
        if name:
            canon = canonical(f"{ROOT}.{name}")
            names = aliases.setdefault(id(mod), [])
            if canon not in names:
                names.append(canon)
    device, dtype = model_device_dtype(index, buffers=True)
    device = torch.device("cpu") if device is None else device
    dtype = dtype if dtype.is_floating_point else torch.float32
    x = torch.zeros((1, *input_shape), device=device, dtype=dtype)
    # Tracing runs the real modules: a buffer they change (a counter, a quantization
    # observer) is put back, as the probe does. What the model warns about on this extra
    # forward of a zeros image, the probe's own forward shows where it belongs.
    with (
        probing(),  # first: one probe (or trace) at a time, before any state is saved
        preserved_buffers(index),  # (the root adds no buffer; its own flag is not kept)
        preserved_training(index),
        torch.no_grad(),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        root.eval()
        try:
            tracer, gm = _trace(root, aliases, x, keep_function, frozenset(stop_after))
        except Exception as exc:
            why = _first_line(exc)
            raise Unsupported(f"torch.fx could not trace the model ({why})") from exc
    tracer.values.clear()  # values of the zeros input: not needed any more
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise Unsupported(f"traced graph has {len(placeholders)} inputs, expected 1")
    dependent: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    traced = TracedModel(
        gm, placeholders[0], tracer.outputs, tracer.leaf_paths, dependent, tracer.raw_outputs
    )
    if tracer.unrolled is not None:
        raise Unrolled(tracer.unrolled, traced)
    return traced


def _trace(
    root: _Root,
    aliases: dict[int, list[str]],
    x: torch.Tensor,
    keep_function: Callable[[Any], bool],
    stop_after: frozenset[str] = frozenset(),
) -> tuple[ConcreteTracer, TracedGraph]:
    tracer = ConcreteTracer(aliases, x, keep_function, stop_after)
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            graph = tracer.trace(root)
        except StopForward:
            graph = tracer.graph
            graph.output(None)
    for node in graph.nodes:
        # fx marks a wrapped call so that generated code registers it again (globally, by
        # name); the graph is never traced again.
        node.meta.pop("is_wrapped", None)
    return tracer, TracedGraph(root, graph)


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _first_line(exc: BaseException) -> str:
    exc = _root_cause(exc)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
