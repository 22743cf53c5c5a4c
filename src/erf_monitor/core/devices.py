"""Where a model lives: the device and dtype of its first parameter, the one lookup every
stage uses (the probe, the monitor, the TRF trace)."""

from __future__ import annotations

import torch
from torch import nn

from erf_monitor.core.index import ModelIndex

__all__ = ["model_device_dtype"]


def model_device_dtype(
    model: nn.Module | ModelIndex, *, buffers: bool = False
) -> tuple[torch.device | None, torch.dtype]:
    """The device and dtype of ``model``'s first parameter (with ``buffers``: else of its first
    buffer); ``(None, torch.float32)`` when it has none. The dtype is the tensor's own, integer
    ones included: callers choose their fallbacks (a device, a floating dtype) themselves.
    ``model`` may be an index of the model (read, not walked again)."""
    if isinstance(model, ModelIndex):
        params, bufs = iter(model.parameters), iter(model.buffers)
    else:
        params, bufs = model.parameters(), model.buffers()
    first: torch.Tensor | None = next(params, None)
    if first is None and buffers:
        first = next(bufs, None)
    if first is None:
        return None, torch.float32
    return first.device, first.dtype
