"""Token outputs of vision transformers mapped back onto their patch grid.

A transformer block returns a token sequence ``(N, L, D)`` (``L = P + h * w + Q``: ``P``
prefix tokens (class / register / distillation tokens), the patch tokens in row-major order,
then ``Q`` suffix tokens, usually none) or, Swin-style, a channels-last map ``(N, H', W', C)``.
The probe needs ``(N, C, *S')``: :func:`tokens_to_spatial` is a differentiable reshape that
drops the extra tokens and puts the patch tokens on their grid, so that the ordinary centre
seed ``S' // 2`` is the centre patch token.

How the layout is found, first match wins:

1. an explicit :class:`TokenLayout` (``compute_erf(..., token_layout=...)``); when only one
   of ``P`` and ``Q`` is given, the other is 0;
2. a model that says how: a torchvision ``VisionTransformer`` (``patch_size``, ``class_token``)
   or a timm-style model (``patch_embed.patch_size``, ``num_prefix_tokens``), also when it is
   wrapped (the first submodule carrying these attributes is used), when it explains ``L``
   exactly: the grid ``S_d // p`` (a patch convolution floors: Dinov2's 14 px patches cut
   96 px into 6, leaving 12 px out), or ``ceil(S_d / p)`` (an embedding that pads);
3. the shapes: a patch size ``p`` dividing every input dim (only the model's own patch size
   when it has one), and ``P + Q`` in ``0..8`` extra tokens with
   ``L - P - Q == prod(S_d // p)``. Exactly one candidate is used; several raise a
   ``ValueError`` that lists them and asks for a ``TokenLayout``. Shapes cannot tell leading
   from trailing tokens, so any extra token makes the layout ambiguous.

A resolved layout keeps the patch size where it is known (the model's, or the one the shapes
imply): the tokens' stride, also at input sizes the patch does not divide.

Channels-last outputs have the rank of a conv-like output and are never guessed: pass
``TokenLayout(channels_last=True)`` for those layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from erf_monitor.core.shapes import ntuple

__all__ = [
    "MAX_PREFIX_TOKENS",
    "ResolvedLayout",
    "TokenLayout",
    "TokenLayoutArg",
    "check_token_layout",
    "layouts_for",
    "resolve_layout",
    "tokens_to_spatial",
]

#: Largest number of non-patch tokens (prefix + suffix) tried when inferring from shapes.
MAX_PREFIX_TOKENS = 8


@dataclass(frozen=True)
class TokenLayout:
    """How a layer's token output maps onto the input's patch grid.

    Attributes:
        grid: patch grid ``(h, w)`` (one entry per input spatial dim); ``None``: inferred
            from the model or the shapes.
        prefix_tokens: number of leading non-patch tokens (class, distillation, register
            tokens) in a ``(N, L, D)`` sequence; ``None``: inferred (0 when only
            ``suffix_tokens`` is given).
        channels_last: the output is a channels-last map ``(N, *grid, C)`` (Swin-style)
            rather than a token sequence. ``TokenLayout(channels_last=False)`` for an output
            of rank ``2 + spatial dims`` declares it channels-first ``(N, C, *S)`` (for the
            rare output whose shape and model cannot tell which).
        suffix_tokens: number of trailing non-patch tokens (after the patch tokens);
            ``None``: inferred (0 when only ``prefix_tokens`` is given).

    Examples:
        >>> TokenLayout(grid=(14, 14), prefix_tokens=1)  # ViT-B/16 at 224 x 224
        TokenLayout(grid=(14, 14), prefix_tokens=1, channels_last=False, suffix_tokens=None)
    """

    grid: tuple[int, ...] | None = None
    prefix_tokens: int | None = None
    channels_last: bool = False
    suffix_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.grid is not None and (
            not self.grid or any(int(g) != g or g < 1 for g in self.grid)
        ):
            raise ValueError(f"TokenLayout.grid must hold positive ints, got {self.grid!r}")
        for what in ("prefix_tokens", "suffix_tokens"):
            value = getattr(self, what)
            if value is not None and value < 0:
                raise ValueError(f"TokenLayout.{what} must be >= 0, got {value}")
        if self.channels_last and (self.prefix_tokens or self.suffix_tokens):
            raise ValueError("A channels-last layout has no prefix or suffix tokens.")


@dataclass(frozen=True)
class ResolvedLayout:
    """A layout with every field known for one output shape (``patch``: the patch size per
    dim where known, the tokens' stride in input pixels)."""

    grid: tuple[int, ...]
    prefix_tokens: int
    channels_last: bool
    suffix_tokens: int = 0
    patch: tuple[int, ...] | None = field(default=None, compare=False)


#: What ``compute_erf(..., token_layout=...)`` accepts.
TokenLayoutArg = TokenLayout | Mapping[str, TokenLayout] | None


def check_token_layout(token_layout: Any) -> None:
    """Raise ``TypeError`` unless ``token_layout`` is a layout, a mapping of them, or None."""
    if token_layout is None or isinstance(token_layout, TokenLayout):
        return
    if isinstance(token_layout, Mapping) and all(
        isinstance(k, str) and (v is None or isinstance(v, TokenLayout))
        for k, v in token_layout.items()
    ):
        return
    raise TypeError(
        "token_layout must be a TokenLayout, a dict {layer name or glob: TokenLayout}, or "
        f"None; got {token_layout!r}"
    )


def layouts_for(token_layout: TokenLayoutArg, names: Sequence[str]) -> dict[str, TokenLayout]:
    """``token_layout`` as ``{layer: TokenLayout}`` for the probed layers ``names``.

    One layout applies to every layer; a mapping's keys are layer names or globs (as in
    ``layers``: ``*`` within a dotted segment, ``**`` across); an exact name wins over a glob,
    and a key that matches no probed layer is an error.

    Examples:
        >>> cl = TokenLayout(channels_last=True)
        >>> layouts_for({"stages.*": cl}, ["stem", "stages.0", "stages.1"])  # doctest: +ELLIPSIS
        {'stages.0': TokenLayout(...), 'stages.1': TokenLayout(...)}
    """
    from erf_monitor.targets.layers import _canonical, _glob_regex

    check_token_layout(token_layout)
    if token_layout is None:
        return {}
    if isinstance(token_layout, TokenLayout):
        return dict.fromkeys(names, token_layout)
    out: dict[str, TokenLayout] = {}
    exact: set[str] = set()
    unknown: list[str] = []
    for key, layout in token_layout.items():
        spec = _canonical(key)
        if spec in names:
            matched = [spec]
        elif any(ch in spec for ch in "*?["):
            regex = _glob_regex(spec)
            matched = [n for n in names if regex.fullmatch(n)]
        else:
            matched = []
        if not matched:
            unknown.append(key)
        for n in matched:
            if n in exact and spec != n:
                continue
            if spec == n:
                exact.add(n)
            if layout is None:
                out.pop(n, None)
            else:
                out[n] = layout
    if unknown:
        raise ValueError(
            f"token_layout names layer(s) {sorted(unknown)} that are not probed ({list(names)})."
        )
    return out


def _as_tuple(v: Any, nd: int) -> tuple[int, ...] | None:
    """A patch size as ``nd`` ints; ``None`` for anything else (no patch size to trust)."""
    if isinstance(v, int) or (
        isinstance(v, (tuple, list)) and len(v) == nd and all(isinstance(i, int) for i in v)
    ):
        return ntuple(v, nd)
    return None


def _model_hints(model: nn.Module | None, nd: int) -> list[tuple[tuple[int, ...], int | None]]:
    """``(patch_size, prefix or None)`` pairs advertised by the model or its submodules."""
    if model is None:
        return []
    hints: list[tuple[tuple[int, ...], int | None]] = []
    for m in model.modules():
        # torchvision VisionTransformer: ``patch_size`` (int) and ``class_token``.
        patch = _as_tuple(getattr(m, "patch_size", None), nd)
        if patch is not None and hasattr(m, "class_token"):
            hints.append((patch, 1))
            continue
        # timm VisionTransformer / DeiT: ``patch_embed.patch_size`` and ``num_prefix_tokens``.
        embed = getattr(m, "patch_embed", None)
        patch = _as_tuple(getattr(embed, "patch_size", None), nd) if embed is not None else None
        if patch is not None:
            prefix = getattr(m, "num_prefix_tokens", None)
            hints.append((patch, prefix if isinstance(prefix, int) else None))
        # Hugging Face ViT/DeiT/Dinov2 embeddings: ``patch_embeddings.patch_size`` and a
        # ``cls_token`` (plus ``distillation_token`` / ``register_tokens`` when present).
        hf_embed = getattr(m, "patch_embeddings", None)
        patch = _as_tuple(getattr(hf_embed, "patch_size", None), nd) if hf_embed else None
        if patch is not None and isinstance(getattr(m, "cls_token", None), torch.Tensor):
            prefix = 1 + int(isinstance(getattr(m, "distillation_token", None), torch.Tensor))
            registers = getattr(m, "register_tokens", None)
            if isinstance(registers, torch.Tensor) and registers.dim() >= 2:
                prefix += int(registers.shape[1])
            hints.append((patch, prefix))
        if len(hints) >= 4:
            break
    return hints


#: A candidate layout: ``(grid, prefix tokens, suffix tokens, patch size)``.
_Candidate = tuple[tuple[int, ...], int, int, tuple[int, ...]]


def _patch_grids(patch: tuple[int, ...], spatial: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The grids a patch embedding of ``patch`` makes of ``spatial``: floored (a strided
    convolution), then ceiled (an embedding that pads), the same one once."""
    floor = tuple(s // p for s, p in zip(spatial, patch))
    ceil = tuple(-(-s // p) for s, p in zip(spatial, patch))
    return [g for g in dict.fromkeys([floor, ceil]) if all(g)]


def _splits(extra: int, prefix: int | None, suffix: int | None) -> list[tuple[int, int]]:
    """``(P, Q)`` with ``P + Q == extra``: every split when neither is given, else the given
    one(s) with 0 for the other."""
    if extra < 0:
        return []
    if prefix is None and suffix is None:
        return [(p, extra - p) for p in range(extra, -1, -1)]
    q, r = prefix or 0, suffix or 0
    return [(q, r)] if q + r == extra else []


def _shape_candidates(
    length: int,
    spatial: tuple[int, ...],
    prefix: int | None,
    suffix: int | None,
    patches: Sequence[tuple[int, ...]] = (),
) -> list[_Candidate]:
    """Layouts of the model's patch sizes ``patches`` (their grids), or, for a model that
    has none, of one patch size dividing every input dim exactly."""
    grids = [(g, patch) for patch in patches for g in _patch_grids(patch, spatial)]
    if not grids:
        sizes = [p for p in range(1, min(spatial) + 1) if not any(s % p for s in spatial)]
        grids = [(tuple(s // p for s in spatial), (p,) * len(spatial)) for p in sizes]
    out = []
    for grid, patch in grids:
        extra = length - math.prod(grid)
        if extra > MAX_PREFIX_TOKENS and prefix is None and suffix is None:
            continue
        out += [(grid, q, r, patch) for q, r in _splits(extra, prefix, suffix)]
    return out


def _describe(cands: list[_Candidate]) -> str:
    def one(grid: tuple[int, ...], q: int, r: int, patch: tuple[int, ...]) -> str:
        extra = [f"{q} prefix"] if q or not r else []
        extra += [f"{r} suffix"] if r else []
        size = patch[0] if len(set(patch)) == 1 else "x".join(map(str, patch))
        of = f" (patch {size})" if patch else ""
        return f"grid {'x'.join(map(str, grid))} with {' + '.join(extra)} token(s){of}"

    return ", ".join(one(*c) for c in cands)


def resolve_layout(
    name: str,
    shape: tuple[int, ...],
    layout: TokenLayout | None,
    input_spatial: tuple[int, ...],
    model: nn.Module | None = None,
) -> ResolvedLayout | None:
    """The layout of a layer output of ``shape``, or ``None`` if it is used as it is.

    Conv-like ``(N, C, *S')`` and flat ``(N, K)`` outputs need no layout unless one is given.
    A ``(N, L, D)`` output of a model with 2 or 3 spatial input dims is a token sequence.

    Raises:
        ValueError: a layout that does not fit the shape, or a token sequence whose grid
            cannot be inferred unambiguously.
    """
    nd = len(input_spatial)
    rank = len(shape)
    hint = (
        "pass compute_erf(..., token_layout=TokenLayout(grid=(h, w), prefix_tokens=P, "
        "suffix_tokens=Q)) (or a dict {layer: TokenLayout})"
    )
    if layout is None:
        if rank == 2 or rank == nd + 2 or rank != 3 or nd < 2:
            return None
    elif layout.channels_last:
        if rank != nd + 2:
            raise ValueError(
                f"Layer {name!r}: TokenLayout(channels_last=True) expects (N, *grid, C) with "
                f"{nd} grid dims, got shape {shape}."
            )
        grid = tuple(shape[1:-1])
        if layout.grid is not None and tuple(layout.grid) != grid:
            raise ValueError(
                f"Layer {name!r}: output grid {grid} != TokenLayout.grid {layout.grid}."
            )
        return ResolvedLayout(grid, 0, True)
    elif rank == nd + 2 and layout.grid is None and layout == TokenLayout(channels_last=False):
        return None  # declared channels-first (N, C, *S)
    elif rank != 3:
        raise ValueError(
            f"Layer {name!r}: a token layout expects a sequence (N, L, D), got shape {shape} "
            "(TokenLayout(channels_last=True) is for (N, *grid, C) maps)."
        )
    length = shape[1]
    prefix = None if layout is None else layout.prefix_tokens
    suffix = None if layout is None else layout.suffix_tokens
    hints = _model_hints(model, nd)
    cands: list[_Candidate]
    if layout is not None and layout.grid is not None:
        grid = tuple(layout.grid)
        if len(grid) != nd:
            raise ValueError(f"Layer {name!r}: TokenLayout.grid {grid} needs {nd} entries.")
        # The patch: the model's, if its grid is this one; else the one dividing the input.
        patch = next((p for p, _ in hints if grid in _patch_grids(p, input_spatial)), None)
        if patch is None and all(s % g == 0 for s, g in zip(input_spatial, grid)):
            patch = tuple(s // g for s, g in zip(input_spatial, grid))
        splits = _splits(length - math.prod(grid), prefix, suffix)
        cands = [(grid, q, r, patch or ()) for q, r in splits]
        if not cands:
            given = [f"{v} {w} token(s)" for v, w in ((prefix, "prefix"), (suffix, "suffix"))]
            known = [g for g, v in zip(given, (prefix, suffix)) if v is not None]
            raise ValueError(
                f"Layer {name!r}: {length} tokens do not fit grid {grid}"
                + (f" with {' and '.join(known)}" if known else "")
                + "."
            )
    else:
        for patch, hint_prefix in hints:
            for grid in _patch_grids(patch, input_spatial):
                q = prefix if prefix is not None else hint_prefix
                extra = length - math.prod(grid)
                if q is None and (suffix is not None or extra == 0):
                    q = 0
                if q is not None and (suffix or 0) + q == extra:
                    return ResolvedLayout(grid, q, False, suffix or 0, patch)
        patches = list(dict.fromkeys(p for p, _ in hints))
        # (a patch size of the model that explains no layout is another part's: ignored)
        cands = _shape_candidates(length, input_spatial, prefix, suffix, patches)
        cands = cands or _shape_candidates(length, input_spatial, prefix, suffix)
    if len(cands) == 1:
        grid, q, r, patch = cands[0]
        return ResolvedLayout(grid, q, False, r, patch or None)
    what = (
        f"is ambiguous ({_describe(cands)})"
        if cands
        else "cannot be inferred (no patch size divides the input into a grid of that many tokens)"
    )
    raise ValueError(
        f"Layer {name!r} returned a token sequence of shape {shape} for an input of spatial "
        f"shape {input_spatial}; its patch grid {what}: {hint}."
    )


def tokens_to_spatial(out: torch.Tensor, layout: ResolvedLayout) -> torch.Tensor:
    """Differentiable view of a token output as ``(N, D, *grid)`` (patch tokens only).

    Examples:
        >>> t = torch.arange(2 * 5 * 3.0).reshape(2, 5, 3)  # class token + 2x2 patches, D = 3
        >>> g = tokens_to_spatial(t, ResolvedLayout((2, 2), 1, False))
        >>> g.shape, bool(g[0, :, 1, 0].equal(t[0, 3]))
        (torch.Size([2, 3, 2, 2]), True)
    """
    if layout.channels_last:
        return out.movedim(-1, 1)
    patches = out[:, layout.prefix_tokens : out.shape[1] - layout.suffix_tokens]
    return patches.transpose(1, 2).reshape(out.shape[0], out.shape[2], *layout.grid)
