"""Lean input-only backwards: the probe's backward skips work a seed's gradient cannot reach.

A probe differentiates one seed unit (or a few) w.r.t. the input, so the gradient flowing
back through the model is zero outside the seed's TRF cone. Autograd's own kernels do not
know that: a convolution's input gradient runs over the whole tensor, and an eval-mode
BatchNorm runs its full native backward. While a probe's forward runs, hooks on the model's
plain modules keep every *output* as the module computed it (the forward is the model's own,
bit for bit) and give it a leaner *backward*:

* **Convolutions** (exact ``nn.Conv1d/2d/3d``, zero padding): the input gradient is computed
  only over the box where the output gradient is non-zero, widened by the kernel's reach,
  and is zero elsewhere. Every term left out is a product with an exact zero, so the result
  equals the full kernel's up to float rounding order (a non-finite weight, whose NaNs the
  probe reports either way, would spread them over fewer pixels). When the box covers most
  of the tensor the full kernel runs (nothing to skip).
* **Eval-mode BatchNorm** with running statistics: an affine map per channel, whose input
  gradient is the output gradient times ``weight / sqrt(running_var + eps)``.

The lean hook runs before the model's own forward hooks on the module: what they do with
the output (replace it, change it in place) is differentiated on top of the module's lean
backward, as it would be on top of autograd's. Only modules whose ``forward`` is the class's
own take part (none while a global forward hook, which runs before every module's own, is
registered), only outputs of at least ``_MIN_ELEMENTS`` elements (smaller kernels cost about
what the hook's Python does; no hook at all on a smaller input), only on CPU (where it was
measured: docs/benchmarks.md; on an accelerator each convolution's box would cost a device
sync), only in the probing thread, and only while the probe's forward runs (the hooks are
removed afterwards, also when the forward raises).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.grad import conv1d_input, conv2d_input, conv3d_input
from torch.nn.modules import module as _module

from erf_monitor.core.index import ModelIndex
from erf_monitor.core.probing import this_thread_only
from erf_monitor.probe.seeds import Box
from erf_monitor.targets.observe import ForwardFn

__all__ = ["conv_input_grad", "lean_forward", "lean_modules", "nonzero_box"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_INPUT_GRAD = {1: conv1d_input, 2: conv2d_input, 3: conv3d_input}
#: Device types whose probes use lean backwards.
_DEVICES = frozenset({"cpu"})
#: A gradient box holding at least this fraction of its tensor runs the full kernel.
_FULL_FRACTION = 0.8
#: Outputs smaller than this (elements) keep autograd's backward: their kernels take about
#: as long as the hook's Python (resnet18 at 32 px probed 12% slower with every module lean).
_MIN_ELEMENTS = 1 << 16


def nonzero_box(grad: torch.Tensor) -> Box | None:
    """The inclusive ``(first, last)`` per spatial dim of ``grad`` ``(N, C, *spatial)`` around
    every non-zero entry (NaN counts as non-zero); ``None`` when all of it is zero."""
    spatial = grad.dim() - 2
    g = grad.detach()
    # Two plain reductions (no tensor the size of ``grad``): 7x cheaper than ``ne(0).any()``.
    hit = (g.amax(dim=(0, 1)) != 0) | (g.amin(dim=(0, 1)) != 0)
    box = []
    for d in range(spatial):
        others = tuple(e for e in range(spatial) if e != d)
        line = hit.any(dim=others) if others else hit
        where = line.nonzero()
        if where.numel() == 0:
            return None
        box.append((int(where[0]), int(where[-1])))
    return tuple(box)


def conv_input_grad(
    grad: torch.Tensor,
    input_shape: Sequence[int],
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """The gradient w.r.t. a zero-padded convolution's input of shape ``input_shape``, given
    the gradient ``grad`` w.r.t. its output, computed over ``grad``'s non-zero box only."""
    box = nonzero_box(grad)
    if box is None:
        return grad.new_zeros(input_shape)
    whole = math.prod(b - a + 1 for a, b in box) >= _FULL_FRACTION * math.prod(grad.shape[2:])
    if all(k == 1 for k in weight.shape[2:]) and groups == 1 and not any(padding):
        if whole:
            box = tuple((0, n - 1) for n in grad.shape[2:])
        return _pointwise_input_grad(grad, box, input_shape, weight, stride)
    full_grad = _INPUT_GRAD[grad.dim() - 2]
    if whole:
        return full_grad(list(input_shape), weight, grad, stride, padding, dilation, groups)
    # The input span that the box's outputs read, padding included (may stick out).
    starts = [a * s - p for (a, _), s, p in zip(box, stride, padding)]
    reach = [(k - 1) * d + 1 for k, d in zip(weight.shape[2:], dilation)]
    stops = [b * s - p + r for (_, b), s, p, r in zip(box, stride, padding, reach)]
    part = grad[_rows(box)].contiguous()
    span = [*input_shape[:2], *(b - a for a, b in zip(starts, stops))]
    local = full_grad(span, weight, part, stride, 0, dilation, groups)
    out = grad.new_zeros(input_shape)
    dst, src = [slice(None)] * 2, [slice(None)] * 2
    for a, b, n in zip(starts, stops, input_shape[2:]):
        lo, hi = max(a, 0), min(b, n)  # the padding's part of the span has no gradient
        dst.append(slice(lo, hi))
        src.append(slice(lo - a, hi - a))
    out[tuple(dst)] = local[tuple(src)]
    return out


def _rows(box: Box, stride: Sequence[int] | None = None) -> tuple[slice, ...]:
    """``[:, :, box]`` (each dim's ``first * s`` to ``last * s`` in steps of ``s``)."""
    steps = stride or [1] * len(box)
    return (
        slice(None),
        slice(None),
        *[slice(a * s, b * s + 1, s) for (a, b), s in zip(box, steps)],
    )


def _pointwise_input_grad(
    grad: torch.Tensor,
    box: Box,
    input_shape: Sequence[int],
    weight: torch.Tensor,
    stride: Sequence[int],
) -> torch.Tensor:
    """A 1 x 1 convolution's (no padding, one group) input gradient as one matrix product
    over ``box``: up to 3.5x faster than the convolution kernels on CPU, which run a strided
    1 x 1 backward (a ResNet's downsampling shortcut) on a slow path (docs/benchmarks.md)."""
    part = grad[_rows(box)]
    n, c_out, *size = part.shape
    local = torch.matmul(weight.flatten(1).t(), part.reshape(n, c_out, -1))
    local = local.view(n, weight.shape[1], *size)
    if tuple(local.shape) == tuple(input_shape):
        return local
    out = grad.new_zeros(input_shape)
    out[_rows(box, stride)] = local
    return out


class _Given:
    """Hands an already computed output through ``Function.apply`` without making it one of
    the function's tensor inputs (autograd would then treat the output as a view of it)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class _ConvBackward(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, given: _Given, weight: torch.Tensor, conv: nn.Module
    ) -> torch.Tensor:
        ctx.input_shape = x.shape
        ctx.args = (weight, conv.stride, conv.padding, conv.dilation, conv.groups)
        return given.tensor

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return conv_input_grad(grad, ctx.input_shape, *ctx.args), None, None, None


class _AffineBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, given: _Given, scale: torch.Tensor) -> torch.Tensor:
        ctx.scale = scale
        return given.tensor

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return grad * ctx.scale, None, None


def _plain(t: Any) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)


def _lean_output(module: nn.Module, args: tuple[Any, ...], out: Any) -> torch.Tensor | None:
    """``out`` with a lean backward (``None``: left as the module made it)."""
    if len(args) != 1 or not _plain(args[0]) or not _plain(out):
        return None
    x = args[0]
    if not (x.requires_grad and out.requires_grad and x.dtype == out.dtype):
        return None
    if out.numel() < _MIN_ELEMENTS:
        return None
    if x.device.type not in _DEVICES:
        return None
    if isinstance(module, _CONVS):
        w = module.weight
        if not _plain(w) or w.dtype != x.dtype:
            return None
        result: torch.Tensor = _ConvBackward.apply(x, _Given(out.detach()), w.detach(), module)
        return result
    assert isinstance(module, _NORMS)
    var, weight = module.running_var, module.weight
    if module.training or not module.track_running_stats or not isinstance(var, torch.Tensor):
        return None  # batch statistics: not an affine map
    scale = torch.rsqrt(var.detach() + module.eps)
    if weight is not None:
        scale = scale * weight.detach()
    scale = scale.to(x.dtype).reshape(1, -1, *([1] * (x.dim() - 2)))
    result = _AffineBackward.apply(x, _Given(out.detach()), scale)
    return result


def lean_modules(index: ModelIndex) -> tuple[nn.Module, ...]:
    """The modules of ``index`` whose backward a probe may make lean: plain convolutions
    (zero padding given as numbers, not ``"same"``) and BatchNorms without an instance
    ``forward`` (none at all while a global forward hook is registered: it runs before the
    lean hook and may replace the output)."""
    if _module._global_forward_hooks:
        return ()
    out = []
    for m in index.modules:
        if type(m) not in (*_CONVS, *_NORMS) or "forward" in vars(m):
            continue
        if isinstance(m, _CONVS) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            continue
        out.append(m)
    return tuple(out)


@contextlib.contextmanager
def _hooked(modules: Sequence[nn.Module]) -> Iterator[None]:
    # First among the module's own hooks: theirs then see (and build on) the lean output.
    lean = this_thread_only(_lean_output)
    handles = [m.register_forward_hook(lean, prepend=True) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def lean_forward(fwd: ForwardFn, modules: Sequence[nn.Module]) -> ForwardFn:
    """``fwd`` with lean backwards on ``modules`` (from :func:`lean_modules`) while it runs."""
    if not modules:
        return fwd

    def forward(net: nn.Module, x: torch.Tensor) -> Any:
        if x.numel() < _MIN_ELEMENTS:  # a small probe: not even the hooks' calls pay off
            return fwd(net, x)
        with _hooked(modules):
            return fwd(net, x)

    return forward
