"""Attention masks: which attention weights a constant mask switches off.

Shifted-window attention (Swin) adds a constant mask to its logits so that a window that
the cyclic shift filled from both ends of the image attends within each part only: 0 where
a query may read a key, ``-100`` where it may not (torchvision, timm and Hugging Face all
use ``-100``; other models use ``-inf`` or ``torch.finfo(dtype).min``, or pass a boolean
mask to ``scaled_dot_product_attention``).

**The decision.** A logit that a constant mask shifts by ``-100`` or less is *masked*: the key
does not influence the query (its weight, and the gradient through it, is ``exp(-100)`` ≈
``3.7e-44`` times an unmasked key's with the same score: below the resolution of half
precision and 40 orders of magnitude below any ERF). The ``-100`` of Swin stands for
``-inf``: the theoretical receptive field follows the windows the model was designed with,
not a wrap-around across the image that exists only as a rounding residue. A row whose keys
are all masked is not masked at all (softmax of equally shifted logits is unchanged).

This module finds, by a forward analysis over the traced graph, which entries of a tensor
are masked logits (:meth:`Masks.logits`) and which are attention weights that such a mask
made zero (:meth:`Masks.weights`): constants (``get_attr`` nodes) are read, additions of a
mask are followed, and shape ops (views, permutes, expands, dropout in eval mode) are
replayed on the boolean pattern. Anything else has no known pattern (``None``): the walk
then treats every weight as live (a superset, never a wrong exclusion).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from erf_monitor.trf.tracer import TracedModel

__all__ = ["MASKED", "Masks"]

#: A logit shifted by this much or more (negative) is masked (see the module docstring).
MASKED = -100.0

_ADD = {operator.add, operator.iadd, torch.add, torch.Tensor.add, torch.Tensor.add_}
_SHAPE_METHODS = {
    "view", "reshape", "permute", "transpose", "unsqueeze", "squeeze", "expand", "flatten",
    "unflatten", "contiguous", "clone", "movedim", "swapaxes", "swapdims",
}  # fmt: skip
_SAME_METHODS = {"to", "float", "double", "half", "bfloat16", "type", "type_as", "detach"}
_SHAPE_FUNCTIONS: set[Any] = {
    torch.reshape, torch.permute, torch.transpose, torch.unsqueeze, torch.squeeze,
    torch.flatten, torch.unflatten, torch.movedim, operator.getitem,
}  # fmt: skip
_SAME_FUNCTIONS: set[Any] = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.clone,
    torch.Tensor.contiguous, torch.Tensor.clone,
}  # fmt: skip
_SAME_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}


class Masks:
    """Masked-logit and zero-weight patterns of the nodes of one traced graph (memoised).

    Patterns are boolean tensors broadcastable to the node's shape (``True``: masked logit,
    or zero weight), or ``None`` when no entry is known to be masked.
    """

    def __init__(self, traced: TracedModel) -> None:
        self.traced = traced
        self._logits: dict[fx.Node, torch.Tensor | None] = {}
        self._weights: dict[fx.Node, torch.Tensor | None] = {}

    def logits(self, node: Any) -> torch.Tensor | None:
        """Entries of ``node`` that are masked logits (``<= MASKED`` shifts or ``-inf``)."""
        return _memo(self._logits, node, self._find_logits)

    def weights(self, node: Any) -> torch.Tensor | None:
        """Entries of ``node`` that are attention weights a mask made zero."""
        return _memo(self._weights, node, self._find_weights)

    def constant(self, node: Any) -> torch.Tensor | None:
        """The value of a constant tensor argument (a ``get_attr`` node), else None."""
        if isinstance(node, fx.Node) and node.op == "get_attr":
            value = self.traced.constant(node)
            return value.detach() if isinstance(value, torch.Tensor) else None
        return None

    # -- the analysis

    def _find_logits(self, node: fx.Node) -> torch.Tensor | None:
        value = self.constant(node)
        if value is not None:
            if not value.is_floating_point():
                return None
            masked = value <= MASKED
            return masked if bool(masked.any()) else None
        if node.op == "get_attr":
            return None
        target = node.target
        if _is_function(node, _ADD) or (node.op == "call_method" and target in ("add", "add_")):
            return _union(node, self.logits)
        if _is_function(node, {operator.sub, torch.sub}) or target == "sub":
            return self.logits(node.args[0])
        if target == "masked_fill" or _is_function(node, {torch.masked_fill}):
            cond, fill = self.constant(_arg(node, 1, "mask")), _arg(node, 2, "value")
            if cond is None or not isinstance(fill, (int, float)):
                return None
            before = self.logits(node.args[0])
            if fill <= MASKED:
                return cond if before is None else before | cond
            return None if before is None else before & ~cond
        return self._replay(node, self.logits)

    def _find_weights(self, node: fx.Node) -> torch.Tensor | None:
        if node.op == "get_attr":
            return None
        if self._is_softmax(node):
            logits = self.logits(node.args[0])
            shape = _shape(node)
            dim = self._softmax_dim(node)
            if logits is None or shape is None or dim is None:
                return None
            full = logits.expand(shape)
            return full & ~full.all(dim=dim, keepdim=True)
        if _is_function(node, {operator.mul, torch.mul}) or node.target == "mul":
            return _union(node, self.weights)
        return self._replay(node, self.weights)

    def _is_softmax(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.traced.gm.get_submodule(str(node.target)), nn.Softmax)
        return _is_function(node, _SOFTMAX) or (
            node.op == "call_method" and node.target == "softmax"
        )

    def _softmax_dim(self, node: fx.Node) -> int | None:
        if node.op == "call_module":
            dim = getattr(self.traced.gm.get_submodule(str(node.target)), "dim", None)
        else:
            dim = _arg(node, 1, "dim")
        return int(dim) if isinstance(dim, int) else None

    def _replay(
        self, node: fx.Node, pattern: Callable[[Any], torch.Tensor | None]
    ) -> torch.Tensor | None:
        """A shape op (or a pass-through op) applied to its first argument's pattern."""
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        src = node.args[0]
        if node.op == "call_module":
            mod = self.traced.gm.get_submodule(str(node.target))
            return pattern(src) if isinstance(mod, _SAME_MODULES) else None
        if (node.op == "call_method" and node.target in _SAME_METHODS) or _is_function(
            node, _SAME_FUNCTIONS
        ):
            return pattern(src)
        shaped = (node.op == "call_method" and node.target in _SHAPE_METHODS) or _is_function(
            node, _SHAPE_FUNCTIONS
        )
        if not shaped:
            return None
        before = pattern(src)
        in_shape, out_shape = _shape(src), _shape(node)
        if before is None or in_shape is None or out_shape is None:
            return None
        rest, kwargs = node.args[1:], dict(node.kwargs)
        if _has_node((rest, kwargs)):
            return None
        full = before.expand(in_shape)
        try:
            if node.op == "call_method":
                out = getattr(full, str(node.target))(*rest, **kwargs)
            else:
                out = node.target(full, *rest, **kwargs)  # type: ignore[operator]
        except (RuntimeError, TypeError, IndexError, ValueError):
            return None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(out_shape):
            return None
        return out


def _memo(
    cache: dict[fx.Node, torch.Tensor | None],
    node: Any,
    find: Callable[[fx.Node], torch.Tensor | None],
) -> torch.Tensor | None:
    """``find(node)``, computed once per node (``None`` for an argument that is no node)."""
    if not isinstance(node, fx.Node):
        return None
    if node not in cache:
        cache[node] = find(node)
    return cache[node]


def _union(node: fx.Node, pattern: Callable[[Any], torch.Tensor | None]) -> torch.Tensor | None:
    """The union of the patterns of ``node``'s first two node arguments (an add of logits,
    a product of weights), ``None`` when neither has one."""
    parts = [pattern(a) for a in node.args[:2] if isinstance(a, fx.Node)]
    found = [p for p in parts if p is not None]
    if not found:
        return None
    out = found[0]
    for p in found[1:]:
        out = out | p
    return out


def _is_function(node: fx.Node, table: set[Any]) -> bool:
    if node.op != "call_function":
        return False
    try:
        return node.target in table
    except TypeError:
        return False


def _arg(node: fx.Node, i: int, name: str) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _has_node(value: Any) -> bool:
    found = False

    def visit(a: fx.Node) -> fx.Node:
        nonlocal found
        found = True
        return a

    fx.node.map_arg(value, visit)
    return found
