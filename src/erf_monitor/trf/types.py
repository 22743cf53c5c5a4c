"""Plain value types shared by the core modules (no torch graph logic here)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["TRF"]


def wrap_flags(wrapped: Sequence[bool], nd: int) -> tuple[bool, ...]:
    """Per dim, whether a field wraps around the input: ``wrapped`` itself, or ``False``
    everywhere when it was not analysed (``()``)."""
    return tuple(bool(w) for w in wrapped) if len(wrapped) == nd else (False,) * nd


@dataclass(frozen=True)
class TRF:
    """Theoretical receptive field of the centre unit of one layer.

    All tuples have one entry per spatial dimension of the input (2 for images).

    Attributes:
        size: ``end - start + 1`` of the unclipped interval, in input pixels;
            ``math.inf`` in a dimension where the layer is global.
        stride: effective stride: input pixels between two neighbouring output units
            (fractional after upsampling / transposed convolutions).
        interval: unclipped inclusive ``(start, end)`` input indices seen by the centre
            unit; ``(-inf, inf)`` in a global dimension.
        clipped: the exact inclusive ``(start, end)`` hull of in-bounds input indices that
            can influence the centre unit (padding accounted for layer by layer).
        global_dims: per dimension, whether a global operation (global pooling, attention,
            squeeze-excitation gating, flatten + linear) or data-dependent sampling makes
            the field the whole input.
        centre: theoretical centre of the field in input pixel coordinates (float).
        output_centre: index of the seed unit in the layer's output spatial dims (the
            centre unit ``S' // 2``; see :mod:`erf_monitor.core.modes` for the one exception).
        output_shape: spatial shape of the layer's output (``()`` if it has none).
        input_shape: spatial shape of the input.
        method: ``"fx"`` (analytic graph walk) or ``"numeric"`` (gradient support of a
            structural surrogate).
        local: True when every operation between input and layer is a local,
            shift-equivariant operation with integer strides, so that cropping the input
            to a stride-aligned window containing ``clipped`` reproduces the centre unit
            exactly (used by the probe's cropping fast path).
        data_dependent: the unit samples the input at positions computed from the input
            (deformable convolution, ``grid_sample`` with a grid computed from the input,
            RoI pooling of predicted boxes): no finite field exists. Reported like a global
            field (every dim global, ``size`` infinite) with the op named in ``reason``.
        reason: why the field is global or data-dependent (empty when it is finite or
            when no single op is to blame).
        tokens: the layer's output was read as tokens on a patch grid.
        wrapped: per dimension, whether circular padding folds part of the interval onto
            the input's far side (the field wraps around the border: the network lives on a
            torus there, and ``clipped`` is then the hull of both parts); ``()`` when not
            analysed.
        masked: the field leaves out attention logits that a constant mask shifts by
            ``-100`` or more (Swin's shifted windows): by the documented rule no dependence,
            though a gradient reaches through them at the ``exp(-100)`` level.
    """

    size: tuple[float, ...]
    stride: tuple[float, ...]
    interval: tuple[tuple[float, float], ...]
    clipped: tuple[tuple[int, int], ...]
    global_dims: tuple[bool, ...]
    centre: tuple[float, ...]
    output_centre: tuple[int, ...]
    output_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    method: Literal["fx", "numeric"]
    local: bool = False
    data_dependent: bool = False
    reason: str = ""
    tokens: bool = False
    wrapped: tuple[bool, ...] = ()
    masked: bool = False

    @property
    def is_global(self) -> bool:
        """True if the field is the whole input in at least one dimension."""
        return any(self.global_dims)

    @property
    def clipped_size(self) -> tuple[int, ...]:
        """Per-dimension size of :attr:`clipped` (``end - start + 1``); where the field
        wraps around the input, the pixels it covers: ``min(size, input size)``."""
        wraps = wrap_flags(self.wrapped, len(self.clipped))
        return tuple(
            int(min(z, n)) if w else int(e - s + 1)
            for (s, e), z, n, w in zip(self.clipped, self.size, self.input_shape, wraps)
        )

    def size_text(self, sep: str = " x ") -> str:
        """:attr:`size` as text (``"5 x 5"``), ``"global"`` in a global dimension."""
        return sep.join(
            "global" if g else str(int(s)) if math.isfinite(s) else "inf"
            for s, g in zip(self.size, self.global_dims)
        )

    def clipped_text(self, sep: str = " x ") -> str:
        """:attr:`clipped_size` as text (``"5 x 5"``)."""
        return sep.join(str(int(s)) for s in self.clipped_size)

    def short_text(self, sep: str = " x ") -> str:
        """The field in a few words: ``"data-dependent"``, ``"global (<clipped>)"`` or the
        :meth:`clipped_text` (a table's cell, a panel's title)."""
        if self.data_dependent:
            return "data-dependent"
        size = self.clipped_text(sep)
        return f"global ({size})" if self.is_global else size

    def __str__(self) -> str:
        if self.data_dependent:
            why = f": {self.reason}" if self.reason else ""
            return f"TRF(data-dependent{why})"
        wraps = ", wraps around" if any(self.wrapped) else ""
        stride = " x ".join(f"{s:g}" for s in self.stride)
        return f"TRF({self.size_text()}, stride {stride}{wraps})"
