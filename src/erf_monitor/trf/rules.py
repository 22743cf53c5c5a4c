"""The registry of the fx walk's op rules (:mod:`erf_monitor.trf.fx`).

A rule maps the region of an op's output to regions of its tensor inputs. It is registered
right above its definition with :func:`op_rule`::

    @op_rule(modules=(nn.Linear,), functions=("linear",), namespaces=(F,))
    def _linear(ctx, node, reg): ...

and a rule made by a factory with a plain call of the same registry below the factory
(``op_rule(functions=("grid_sample",), namespaces=(F,))(_sampling(...))``). An op is a module
class, a function object (looked up by name in ``namespaces``), a tensor method name or a
function of an optional package by ``module.name``. Giving an op that already has a rule a
second, different one raises ``ValueError`` (no silent winner, whatever the import order).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_NAMESPACES",
    "FUNCTION_RULES",
    "METHOD_RULES",
    "MODULE_RULES",
    "NAMED_FUNCTION_RULES",
    "op_rule",
    "register_function",
    "register_method",
    "register_module",
    "register_named",
]

#: ``(ctx, node, region) -> [(input node, input region), ...]``.
Rule = Callable[..., Any]
R = TypeVar("R", bound=Rule)

MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[Any, Rule] = {}
METHOD_RULES: dict[str, Rule] = {}
#: Functions of optional packages, by ``module.name`` (no import needed). Functions that
#: torch.fx keeps as one call (``torch.fx.wrap``) land here.
NAMED_FUNCTION_RULES: dict[str, Rule] = {}

#: Where a function name is looked up when no namespaces are given.
DEFAULT_NAMESPACES = (torch, F, operator, torch.Tensor, torch.special)


def _register(table: dict[Any, Rule], key: Any, rule: Rule) -> None:
    """``table[key] = rule``; an op given another rule before is an error (no silent winner)."""
    known = table.get(key)
    if known is not None and known is not rule:
        raise ValueError(f"{key!r} has two rules: {known!r} and {rule!r}")
    table[key] = rule


def register_module(rule: Rule, *classes: type) -> None:
    """``rule`` for calls of modules of these classes (and their subclasses)."""
    for cls in classes:
        _register(MODULE_RULES, cls, rule)


def register_function(rule: Rule, *names: str, namespaces: Sequence[Any] = ()) -> None:
    """``rule`` for the functions of these names in ``namespaces`` (those that exist)."""
    spaces = namespaces or DEFAULT_NAMESPACES
    for name in names:
        for ns in spaces:
            fn = getattr(ns, name, None)
            if fn is not None and callable(fn):
                with contextlib.suppress(TypeError):  # (an unhashable callable)
                    _register(FUNCTION_RULES, fn, rule)


def register_method(rule: Rule, *names: str) -> None:
    """``rule`` for the tensor methods of these names."""
    for name in names:
        _register(METHOD_RULES, name, rule)


def register_named(rule: Rule, *names: str) -> None:
    """``rule`` for functions of optional packages, by ``module.name``."""
    for name in names:
        _register(NAMED_FUNCTION_RULES, name, rule)


def op_rule(
    *,
    modules: Sequence[type] = (),
    functions: Sequence[str] = (),
    namespaces: Sequence[Any] = (),
    methods: Sequence[str] = (),
    named: Sequence[str] = (),
) -> Callable[[R], R]:
    """Decorator registering a rule for the ops given (see the module docstring); stackable,
    ``namespaces`` applies to ``functions`` (default: :data:`DEFAULT_NAMESPACES`)."""

    def register(rule: R) -> R:
        register_module(rule, *modules)
        register_function(rule, *functions, namespaces=namespaces)
        register_method(rule, *methods)
        register_named(rule, *named)
        return rule

    return register
