"""Finding the image tensor in whatever a dataloader yields.

Training batches come as a bare tensor, a tuple/list ``(images, targets, ...)``, or a dict
(``{"image": ..., "label": ...}``, Hugging Face's ``{"pixel_values": ...}``). The monitor needs
the image batch ``(N, C, *spatial)``; :func:`find_image` finds it, or says clearly what it found
instead and how to point at the right entry (``input_key``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["IMAGE_KEYS", "InputKey", "describe_batch", "find_image"]

#: Dict keys tried first (in this order, then case-insensitively) when a batch is a mapping.
IMAGE_KEYS: tuple[str, ...] = (
    "image",
    "images",
    "img",
    "imgs",
    "pixel_values",
    "x",
    "input",
    "inputs",
)

#: How to point at the image: a dict key / sequence index, or ``fn(batch) -> tensor``.
InputKey = str | int | Callable[[Any], torch.Tensor] | None


def _is_image(obj: Any) -> bool:
    return isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.dim() >= 3


def describe_batch(batch: Any, depth: int = 0) -> str:
    """A short description of a batch's structure, for error messages.

    Examples:
        >>> describe_batch((torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)))
        'tuple(Tensor[2, 3, 8, 8] float32, Tensor[2] int64)'
    """
    if isinstance(batch, torch.Tensor):
        dtype = str(batch.dtype).replace("torch.", "")
        return f"Tensor[{', '.join(map(str, batch.shape))}] {dtype}"
    if depth >= 2:
        return type(batch).__name__
    if isinstance(batch, Mapping):
        items = [f"{k!r}: {describe_batch(v, depth + 1)}" for k, v in list(batch.items())[:8]]
        more = ", ..." if len(batch) > 8 else ""
        return f"{type(batch).__name__}({{{', '.join(items)}{more}}})"
    if isinstance(batch, (tuple, list)):
        items = [describe_batch(v, depth + 1) for v in batch[:8]]
        more = ", ..." if len(batch) > 8 else ""
        return f"{type(batch).__name__}({', '.join(items)}{more})"
    return type(batch).__name__


def _not_found(batch: Any, why: str) -> ValueError:
    return ValueError(
        f"erf-monitor could not find the image tensor in the batch: {why}. The batch is "
        f"{describe_batch(batch)}. An image batch is a floating-point tensor (N, C, *spatial). "
        "Pass input_key=<dict key or tuple index> or input_key=lambda batch: <image tensor>."
    )


def _search(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch if _is_image(batch) else None
    if isinstance(batch, Mapping):
        for key in IMAGE_KEYS:
            if key in batch and _is_image(batch[key]):
                return batch[key]
        lowered = {k.lower(): k for k in batch if isinstance(k, str)}
        for key in IMAGE_KEYS:
            if key in lowered and _is_image(batch[lowered[key]]):
                return batch[lowered[key]]
        values: list[Any] = list(batch.values())
    elif isinstance(batch, (tuple, list)):
        values = list(batch)
    else:
        return None
    for v in values:  # first image at this level, then one level down
        if _is_image(v):
            return v
    for v in values:
        if isinstance(v, (Mapping, tuple, list)):
            found = _search(v)
            if found is not None:
                return found
    return None


def find_image(batch: Any, input_key: InputKey = None) -> torch.Tensor:
    """Return the image tensor ``(N, C, *spatial)`` of a batch.

    Search order without ``input_key``: the batch itself if it is a tensor; in a tuple/list
    the first floating-point tensor with at least 3 dims; in a dict the keys in
    :data:`IMAGE_KEYS` (exact, then case-insensitive), else the first floating-point tensor
    with at least 3 dims; nested containers are searched one level down.

    Args:
        batch: what the dataloader yielded.
        input_key: dict key or tuple index of the image, or a function ``batch -> tensor``.

    Returns:
        The image tensor itself (not a copy).

    Raises:
        ValueError: no image tensor found (the message describes the batch's structure), or
            ``input_key`` does not point at a floating-point tensor with spatial dims.

    Examples:
        >>> x = torch.zeros(4, 3, 8, 8)
        >>> find_image((x, torch.zeros(4, dtype=torch.long))) is x
        True
        >>> find_image({"label": torch.zeros(4), "pixel_values": x}) is x
        True
        >>> find_image({"a": x, "b": x + 1}, input_key="b").sum().item()
        768.0
    """
    if input_key is None:
        found = _search(batch)
        if found is None:
            raise _not_found(batch, "no floating-point tensor with at least 3 dims")
        return found
    if callable(input_key):
        try:
            found = input_key(batch)
        except Exception as exc:
            raise _not_found(batch, f"input_key({type(batch).__name__}) raised {exc!r}") from exc
    else:
        try:
            found = batch[input_key]
        except (KeyError, IndexError, TypeError) as exc:
            raise _not_found(batch, f"input_key={input_key!r} is not in the batch") from exc
    if not _is_image(found):
        raise _not_found(
            batch,
            f"input_key={input_key!r} gave {describe_batch(found)}, not a floating-point tensor "
            "(N, C, *spatial)",
        )
    return found
