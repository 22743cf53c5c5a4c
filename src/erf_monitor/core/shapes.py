"""One value per dim: the n-tuple helper every stage normalises sizes with (kernel sizes,
strides, paddings, patch sizes, image sizes)."""

from __future__ import annotations

from typing import Any

__all__ = ["ntuple"]


def ntuple(v: Any, n: int) -> tuple[Any, ...]:
    """``v`` per dim: a list or tuple as a tuple (a one-item one repeated ``n`` times, as torch
    writes ``kernel_size=[3]``), anything else ``(v,) * n``. Nothing is checked or converted:
    callers that need exactly ``n`` ints check them with their own message."""
    if isinstance(v, (list, tuple)):
        if len(v) == 1 and n > 1:
            return tuple(v) * n
        return tuple(v)
    return (v,) * n
