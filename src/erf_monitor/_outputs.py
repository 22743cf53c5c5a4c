"""Turning a layer's raw output into the ``(N, C, *S')`` tensor the probe seeds.

Conv-like outputs pass through. Outputs with no spatial dims, ``(N, K)``, are one unit.
Token sequences ``(N, L, D)`` and channels-last maps are put on their patch grid
(:mod:`erf_monitor._tokens`). Anything else is rejected with a message that says what was
found and how to adapt it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from erf_monitor._errors import ERFProbeWarning
from erf_monitor._tokens import TokenLayout, resolve_layout, tokens_to_spatial

__all__ = ["describe_output", "to_spatial", "warn_if_degenerate_seed"]

#: The channel sum counts as constant below this fraction of the channels' absolute sum.
_DEGENERATE_RTOL = 1e-5


def describe_output(out: Any) -> str:
    """A short human description of a module output (for error messages)."""
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        inner = ", ".join(describe_output(o) for o in out[:4])
        return f"a {type(out).__name__} of {len(out)} ({inner}{', ...' if len(out) > 4 else ''})"
    if isinstance(out, dict):
        return f"a dict with keys {list(out)[:8]}"
    return f"a {type(out).__name__}"


def to_spatial(
    name: str,
    out: Any,
    spatial_ndim: int,
    layout: TokenLayout | None = None,
    model: nn.Module | None = None,
    input_spatial: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Return ``out`` as ``(N, C, *S')`` (or ``(N, K)`` for a layer with no spatial dims).

    Args:
        name: layer name, for messages.
        out: what the layer's forward returned.
        spatial_ndim: number of spatial dims of the probe input.
        layout: token layout of this layer (``None``: inferred for token sequences).
        model: the probed model, whose attributes may tell the patch grid.
        input_spatial: spatial shape of the probe input (needed to infer a patch grid).

    Raises:
        ValueError: for outputs that are not a single conv-like or flat tensor.
    """
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"Layer {name!r} returned {describe_output(out)}; erf-monitor needs a tensor "
            "(N, C, *spatial). Watch a submodule that returns one tensor instead."
        )
    if not out.is_floating_point():
        raise ValueError(f"Layer {name!r} returned a {out.dtype} tensor; it has no gradient.")
    if input_spatial is not None:
        resolved = resolve_layout(name, tuple(out.shape), layout, input_spatial, model)
        if resolved is not None:
            return tokens_to_spatial(out, resolved)
    if out.dim() == spatial_ndim + 2 or out.dim() == 2:
        return out
    raise ValueError(
        f"Layer {name!r} returned a tensor of shape {tuple(out.shape)}, but the input has "
        f"{spatial_ndim} spatial dim(s): expected (N, C, *spatial) with {spatial_ndim} spatial "
        "dims, or (N, K). Token sequences (N, L, D) and channels-last (N, *grid, C) outputs "
        "need compute_erf(..., token_layout=TokenLayout(...)); otherwise watch a layer with a "
        "conv-like output."
    )


def warn_if_degenerate_seed(
    name: str, out: torch.Tensor, mode: str, centre_idx: tuple[int, ...] | None = None
) -> None:
    """Warn when the Luo seed ``sum_k y[n, k, c']`` is (numerically) zero for every sample.

    That is what a LayerNorm over the channels with a uniform scale and zero shift (every
    freshly initialised one: a ViT's final ``norm``/``encoder.ln``, a post-norm
    ``nn.TransformerEncoderLayer``, ConvNeXt's channels-last norms) outputs: the channel sum
    of a normalised vector is constant, so its gradient is zero up to rounding and the
    "ERF map" would be float noise.

    Examples:
        >>> y = torch.nn.functional.layer_norm(torch.randn(2, 5, 8), (8,)).transpose(1, 2)
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     warn_if_degenerate_seed("norm", y, "luo")
        >>> "constant" in str(w[0].message)
        True
    """
    if mode != "luo" or out.dim() < 2 or out.shape[1] < 2:
        return
    with torch.no_grad():
        unit = out
        if out.dim() > 2:
            idx = tuple(s // 2 for s in out.shape[2:]) if centre_idx is None else centre_idx
            index: tuple[int | slice, ...] = (slice(None), slice(None), *idx)
            unit = out[index]
        unit = unit.detach().double()
        seed, scale = unit.sum(1).abs(), unit.abs().sum(1)
        if not bool((scale > 0).all()) or not bool((seed <= _DEGENERATE_RTOL * scale).all()):
            return
    warnings.warn(
        f"Layer {name!r}: the sum over channels of its centre unit is constant (zero) for "
        "every probe sample, so the ERF map is rounding noise. This is what a LayerNorm over "
        "the channels with a uniform scale outputs (e.g. a ViT's final norm or a post-norm "
        "TransformerEncoderLayer at initialisation): watch the layer before the norm, or "
        "use mode='replknet'.",
        ERFProbeWarning,
        stacklevel=4,
    )
