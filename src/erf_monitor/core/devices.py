"""Where a model lives: the device and dtype of its first parameter, the one lookup every
stage uses (the probe, the monitor, the TRF trace)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["model_device_dtype"]


def model_device_dtype(
    model: nn.Module, *, buffers: bool = False
) -> tuple[torch.device | None, torch.dtype]:
    """The device and dtype of ``model``'s first parameter (with ``buffers``: else of its first
    buffer); ``(None, torch.float32)`` when it has none. The dtype is the tensor's own, integer
    ones included: callers choose their fallbacks (a device, a floating dtype) themselves."""
    first: torch.Tensor | None = next(model.parameters(), None)
    if first is None and buffers:
        first = next(model.buffers(), None)
    if first is None:
        return None, torch.float32
    return first.device, first.dtype
