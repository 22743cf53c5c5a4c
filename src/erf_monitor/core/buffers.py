"""Keep a model's buffers exactly as they were across a forward the monitor runs.

A forward changes buffers in more ways than BatchNorm's running statistics in train mode:
quantization-aware training's ``FakeQuantize`` observers update their ranges (and so the
scale) in *any* mode, and user modules count calls or keep running maxima. Any of them
changed by a probe would change the user's training, so every buffer is restored: in place
where a forward modified it (its values or its version counter changed), by object where a
forward replaced it (``self.n = self.n + 1``). Every module's ``training`` flag is put back
too (:func:`preserved_training`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from erf_monitor.core.index import ModelIndex, index_of

__all__ = ["preserved_buffers", "preserved_training"]


@contextlib.contextmanager
def preserved_buffers(model: nn.Module | ModelIndex) -> Iterator[None]:
    """Restore every buffer of ``model`` (or of the model an index walked) on exit (a copy of
    each is kept meanwhile).

    Inference tensors cannot be changed outside inference mode, so they are not copied.
    """
    saved: list[tuple[nn.Module, str, torch.Tensor, int, torch.Tensor | None]] = []
    for module in index_of(model).modules:
        for name, buf in module._buffers.items():
            if buf is None:
                continue
            if buf.is_inference():
                saved.append((module, name, buf, -1, None))
            else:
                saved.append((module, name, buf, buf._version, buf.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buf, version, copy in saved:
                if module._buffers.get(name) is not buf:
                    module._buffers[name] = buf
                # Kernels such as batch norm's update their statistics without moving the
                # version counter: compare the values too (a copy of equal values is skipped,
                # so an unchanged buffer keeps its version).
                if copy is not None and (buf._version != version or not torch.equal(buf, copy)):
                    buf.copy_(copy)


@contextlib.contextmanager
def preserved_training(model: nn.Module | ModelIndex) -> Iterator[None]:
    """Restore every module's ``training`` flag on exit (``model.eval()`` inside is undone;
    ``model`` may be an index of the model).

    Examples:
        >>> net = nn.Sequential(nn.Dropout()).train()
        >>> with preserved_training(net):
        ...     _ = net.eval()
        >>> net.training, net[0].training
        (True, True)
    """
    flags = [(m, m.training) for m in index_of(model).modules]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
