"""The plain one-layer, one-image ERF reference shared by the exact tests.

Luo map of one output unit of one layer: one image at a time, the forward stopped inside the
layer's hook (so no later, in-place, op can touch its output), an input-only backward, the mean
over images of the channel-summed ``|grad|``.
"""

from __future__ import annotations

import torch
from torch import nn


class _Stop(Exception):
    pass


def one_layer_reference(
    model: nn.Module, x: torch.Tensor, layer: str, index: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Luo map of ``layer`` (mean over samples of channel-summed |grad|), one image at a time.

    The forward stops inside the layer's hook, so no later (in-place) op can touch its output.
    """
    module = dict(model.named_modules())[layer]
    model.eval()
    total = torch.zeros(x.shape[2:], dtype=torch.float64)
    for n in range(x.shape[0]):
        xi = x[n : n + 1].clone().requires_grad_(True)
        seeds: list[torch.Tensor] = []

        def hook(_m: nn.Module, _i: object, out: torch.Tensor, seeds: list = seeds) -> None:
            idx = tuple(s // 2 for s in out.shape[2:]) if index is None else index
            seeds.append(out[(0, slice(None), *idx)].sum())
            raise _Stop

        h = module.register_forward_hook(hook)
        try:
            model(xi)
        except _Stop:
            pass
        finally:
            h.remove()
        (g,) = torch.autograd.grad(seeds[0], xi)
        total += g[0].double().abs().sum(0)
    return (total / x.shape[0]).float()
