"""Turning a layer's raw output into the ``(N, C, *S')`` tensor the probe seeds.

Conv-like outputs pass through. Outputs with no spatial dims, ``(N, K)``, are one unit.
Token sequences ``(N, L, D)`` and channels-last maps are put on their patch grid
(:mod:`erf_monitor.targets.tokens`). Anything else is rejected with a message that says what was
found and how to adapt it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from erf_monitor.targets.layers import Selector, Step, format_selector

__all__ = [
    "describe_output",
    "needs_selector_error",
    "output_parts",
    "select_output",
    "suggest_selector",
]


def _describe(out: Any, depth: int) -> str:
    if isinstance(out, torch.Tensor):
        dtype = "" if out.is_floating_point() else f" {str(out.dtype).replace('torch.', '')}"
        return f"tensor {tuple(out.shape)}{dtype}"
    if out is None:
        return "None"
    kind = type(out).__name__
    if isinstance(out, Mapping):
        if depth <= 0:
            return f"{kind} of {len(out)}"
        keys = list(out)
        inner = ", ".join(f"{k!r}: {_describe(out[k], depth - 1)}" for k in keys[:6])
        return f"{kind} {{{inner}{', ...' if len(keys) > 6 else ''}}}"
    if isinstance(out, (tuple, list)):
        if depth <= 0:
            return f"{kind} of {len(out)}"
        if hasattr(out, "_fields"):  # namedtuple
            inner = ", ".join(
                f"{f}={_describe(v, depth - 1)}" for f, v in zip(out._fields[:6], out[:6])
            )
        else:
            inner = ", ".join(_describe(o, depth - 1) for o in out[:4])
        return f"{kind} of {len(out)} ({inner}{', ...' if len(out) > 4 else ''})"
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        if depth <= 0:
            return kind
        fields = [f.name for f in dataclasses.fields(out)][:6]
        inner = ", ".join(f"{f}={_describe(getattr(out, f), depth - 1)}" for f in fields)
        return f"{kind}({inner})"
    return kind


def describe_output(out: Any) -> str:
    """A short human description of a module output (for error messages).

    Examples:
        >>> describe_output((torch.zeros(1, 64, 32), (8, 8)))
        'a tuple of 2 (tensor (1, 64, 32), tuple of 2 (int, int))'
        >>> describe_output({"0": torch.zeros(1, 8, 4, 4)})
        "a dict {'0': tensor (1, 8, 4, 4)}"
    """
    text = _describe(out, 2)
    if isinstance(out, torch.Tensor) or out is None:
        return text
    return ("an " if text[:1].lower() in "aeiou" else "a ") + text


def _children(out: Any) -> list[tuple[Step, Any]]:
    """The selectable parts of ``out`` as ``(step, value)`` pairs, in order."""
    if isinstance(out, Mapping):
        return [(k, out[k]) for k in out if isinstance(k, (int, str))]
    if isinstance(out, (tuple, list)):
        return list(enumerate(out))
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    return []


def output_parts(out: Any, max_depth: int = 2) -> list[tuple[Selector, torch.Tensor]]:
    """Every tensor inside ``out`` (itself included) with the selector that reaches it.

    Containers are tuples, lists, mappings (``OrderedDict``, ``ModelOutput``) and dataclasses,
    searched depth-first up to ``max_depth`` levels.

    Examples:
        >>> [(sel, tuple(t.shape)) for sel, t in output_parts((torch.zeros(2), [torch.zeros(3)]))]
        [((0,), (2,)), ((1, 0), (3,))]
    """
    if isinstance(out, torch.Tensor):
        return [((), out)]
    found: list[tuple[Selector, torch.Tensor]] = []
    if max_depth <= 0:
        return found
    for step, value in _children(out):
        found += [((step, *sel), t) for sel, t in output_parts(value, max_depth - 1)]
    return found


def suggest_selector(out: Any) -> Selector | None:
    """Selector of the first floating-point tensor inside ``out`` (``None`` if there is none)."""
    for sel, t in output_parts(out, max_depth=3):
        if t.is_floating_point():
            return sel
    return None


def _select_step(value: Any, step: Step) -> Any:
    """``value[step]`` in the selector sense; raises ``LookupError`` when there is no such part."""
    if isinstance(value, Mapping):
        if step in value:
            return value[step]
        if isinstance(step, int):
            if str(step) in value:
                return value[str(step)]
            to_tuple = getattr(value, "to_tuple", None)  # ModelOutput: positional access
            if callable(to_tuple):
                items = to_tuple()
                if -len(items) <= step < len(items):
                    return items[step]
        elif dataclasses.is_dataclass(value) and step in {
            f.name for f in dataclasses.fields(value)
        }:
            return getattr(value, step)  # a ModelOutput field that is None
        raise LookupError
    if isinstance(value, (tuple, list)):
        if isinstance(step, int):
            if -len(value) <= step < len(value):
                return value[step]
        elif step in getattr(value, "_fields", ()):
            return getattr(value, step)
        raise LookupError
    if isinstance(step, str):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            if step in _field_names(value):
                return getattr(value, step)
            raise LookupError
        attr = getattr(value, step, _MISSING) if not step.startswith("_") else _MISSING
        if attr is not _MISSING and not callable(attr):
            return attr
    raise LookupError


_MISSING = object()


def _field_names(value: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(value)}


def select_output(out: Any, selector: Selector, name: str) -> Any:
    """The part of a layer's output that ``selector`` picks (``out`` itself for ``()``).

    Args:
        out: what the module returned.
        selector: steps from :func:`~erf_monitor.targets.layers.parse_layer_spec`.
        name: the layer spec, for messages.

    Raises:
        ValueError: when a step names no part; the message lists what the output holds.

    Examples:
        >>> select_output({"0": torch.zeros(1), "pool": None}, (0,), "fpn").shape
        torch.Size([1])
        >>> select_output((torch.zeros(1), None), (2,), "stage")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Layer 'stage': the output selector [2] matches nothing: ...
    """
    value = out
    for i, step in enumerate(selector):
        try:
            value = _select_step(value, step)
        except LookupError:
            where = "output" if i == 0 else f"part {format_selector(selector[:i])}"
            raise ValueError(
                f"Layer {name!r}: the output selector {format_selector((step,))} matches nothing: "
                f"its {where} is {describe_output(value)}."
            ) from None
    return value


def needs_selector_error(name: str, out: Any) -> ValueError:
    """The error for a layer whose (selected) output is not a floating-point tensor."""
    sel = suggest_selector(out)
    if sel is None:
        what = "erf-monitor needs a floating-point tensor (N, C, *spatial); watch another layer."
    else:
        what = f"select one, e.g. {name + format_selector(sel)!r}."
    return ValueError(f"Layer {name!r} returned {describe_output(out)}: {what}")
