"""One walk of a model's modules, read by every stage of a call instead of walking again.

``named_modules`` (behind ``modules()``, ``parameters()``, ``buffers()``...) walks the whole
module tree each time. A probe needs that tree many times over — the device and meta checks,
the plan cache key, saving buffers and ``training`` flags, the name table, the tracer's
aliases — so :func:`model_index` walks it once and every stage reads the result. An index
describes the model as it was when it was taken: it is taken again for every call, never
kept across calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ModelIndex", "index_of", "model_index"]


@dataclass(frozen=True, eq=False)
class ModelIndex:
    """A model's module tree, walked once (see the module docstring).

    Attributes:
        model: the indexed module (the root of the walk).
        paths: ``(name, module)`` of every path, a shared module under each of its names
            (``named_modules(remove_duplicate=False)``).
        named: each module once, under its first name (``named_modules()``).
        parameters: each parameter once, in ``model.parameters()`` order.
        buffers: each buffer once, in ``model.buffers()`` order.
    """

    model: nn.Module
    paths: tuple[tuple[str, nn.Module], ...]
    named: tuple[tuple[str, nn.Module], ...] = field(repr=False)
    parameters: tuple[nn.Parameter, ...] = field(repr=False)
    buffers: tuple[torch.Tensor, ...] = field(repr=False)

    @property
    def modules(self) -> Iterator[nn.Module]:
        """Each module once, in ``model.modules()`` order."""
        return (m for _, m in self.named)


def model_index(model: nn.Module) -> ModelIndex:
    """Walk ``model``'s modules once (the only walk; everything else is read off it)."""
    paths = tuple(model.named_modules(remove_duplicate=False))
    seen: set[int] = set()
    named = []
    for name, module in paths:
        if id(module) not in seen:
            seen.add(id(module))
            named.append((name, module))
    # As torch's ``_named_members``: a tensor shared by several modules counts once.
    params: dict[int, nn.Parameter] = {}
    buffers: dict[int, torch.Tensor] = {}
    for _, module in named:
        for p in module._parameters.values():
            if p is not None:
                params.setdefault(id(p), p)
        for b in module._buffers.values():
            if b is not None:
                buffers.setdefault(id(b), b)
    return ModelIndex(model, paths, tuple(named), tuple(params.values()), tuple(buffers.values()))


def index_of(model: nn.Module | ModelIndex) -> ModelIndex:
    """``model``'s index: the one given, or a new walk of a module."""
    return model if isinstance(model, ModelIndex) else model_index(model)
