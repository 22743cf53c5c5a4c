"""Real images for a probe: read a folder, preprocess as the model expects, stack a batch.

The preprocessing comes from, first match wins:

1. ``transform=``: any callable ``PIL.Image -> Tensor (C, H, W)``, e.g. the torchvision weights'
   own ``weights.transforms()`` (exact);
2. explicit ``size`` / ``mean`` / ``std`` (the fields not given come from 3. or 4.);
3. the model's data config when the model is a timm model (``timm.data.create_transform`` of
   ``resolve_model_data_config(model)``: exact, as timm evaluates it);
4. ImageNet defaults: 224 px, crop fraction 0.875, bilinear, ImageNet mean and std.

The built-in pipeline of 2. and 4. is timm's evaluation pipeline written with Pillow: resize the
shorter side to ``floor(size / crop_pct)``, centre-crop ``size``, scale to ``[0, 1]``,
normalise. Only Pillow is needed (a dependency of matplotlib).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from erf_monitor.core.shapes import ntuple

__all__ = ["IMAGE_SUFFIXES", "Preprocessing", "list_images", "load_images", "preprocessing_for"]

#: File suffixes read as images (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Source = str | PathLike[str] | Sequence[str | PathLike[str]]
_FILTERS = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "nearest": "NEAREST"}


@dataclass(frozen=True)
class Preprocessing:
    """How images are turned into a probe batch (recorded with the results).

    Attributes:
        size: output ``(height, width)``.
        mean: per-channel mean subtracted after scaling to ``[0, 1]``.
        std: per-channel standard deviation divided by.
        crop_pct: the shorter side is resized to ``floor(min(size) / crop_pct)`` before the
            centre crop (1.0: resize straight to ``size``'s shorter side).
        interpolation: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.
        source: where these numbers come from (``"timm data config"``, ``"torchvision
            weights ..."``, ``"explicit"``, ``"ImageNet defaults"``).
        transform: the exact transform used when it is not the built-in pipeline.
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    source: str = "ImageNet defaults"
    transform: Callable[[Any], torch.Tensor] | None = field(default=None, compare=False)

    def __call__(self, image: Any) -> torch.Tensor:
        """``(C, H, W)`` float tensor of a ``PIL.Image``."""
        if self.transform is not None:
            out = self.transform(image)
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"The image transform returned {type(out).__name__}, not a tensor (C, H, W)."
                )
            return out.float()
        from PIL import Image

        h, w = self.size
        short = math.floor(min(h, w) / self.crop_pct)
        iw, ih = image.size
        scale = short / min(iw, ih)
        new = (max(round(iw * scale), w), max(round(ih * scale), h))
        image = image.resize(new, getattr(Image.Resampling, _FILTERS[self.interpolation]))
        left, top = (new[0] - w) // 2, (new[1] - h) // 2
        image = image.crop((left, top, left + w, top + h))
        arr = np.asarray(image, dtype=np.float32) / 255.0
        if arr.ndim == 2:
            arr = arr[:, :, None]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return (x - mean) / std

    def describe(self) -> dict[str, Any]:
        """JSON-friendly record of the preprocessing."""
        return {
            "source": self.source,
            "size": list(self.size),
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "crop_pct": float(self.crop_pct),
            "interpolation": self.interpolation,
        }


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        height, width = ntuple(size, 2)
        return height, width
    values = tuple(int(s) for s in size)
    if len(values) != 2 or any(v < 1 for v in values):
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    return values[0], values[1]


def _timm_config(model: nn.Module | None) -> dict[str, Any] | None:
    if model is None or not isinstance(getattr(model, "pretrained_cfg", None), dict):
        return None
    try:
        from timm.data import resolve_model_data_config
    except ImportError:  # pragma: no cover - a model with pretrained_cfg comes from timm
        return None
    cfg: dict[str, Any] = resolve_model_data_config(model)
    return cfg


def preprocessing_for(
    model: nn.Module | None = None,
    *,
    size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    transform: Callable[[Any], torch.Tensor] | None = None,
    source: str | None = None,
) -> Preprocessing:
    """The :class:`Preprocessing` for ``model`` (see the module docstring for the order).

    Examples:
        >>> p = preprocessing_for(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        >>> p.size, p.source
        ((32, 32), 'explicit')
    """
    if transform is not None:
        # torchvision's ImageClassification presets carry their numbers as attributes.
        crop = _pair(getattr(transform, "crop_size", [224])[0])
        resize = getattr(transform, "resize_size", None)
        interp = getattr(transform, "interpolation", None)
        return Preprocessing(
            size=crop,
            mean=tuple(getattr(transform, "mean", IMAGENET_MEAN)),
            std=tuple(getattr(transform, "std", IMAGENET_STD)),
            crop_pct=min(crop) / float(resize[0]) if resize else 1.0,
            interpolation=str(getattr(interp, "value", interp or "bilinear")),
            source=source or f"transform {type(transform).__name__}",
            transform=transform,
        )
    cfg = _timm_config(model)
    base = Preprocessing()
    if cfg is not None:
        base = Preprocessing(
            size=_pair(tuple(cfg["input_size"][-2:])),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            crop_pct=float(cfg.get("crop_pct", 0.875)),
            interpolation=str(cfg.get("interpolation", "bilinear")),
            source="timm data config",
        )
        if size is None and mean is None and std is None and cfg.get("crop_mode") == "center":
            from timm.data import create_transform

            return Preprocessing(
                **{k: getattr(base, k) for k in ("size", "mean", "std", "crop_pct")},
                interpolation=base.interpolation,
                source=base.source,
                transform=create_transform(**cfg, is_training=False),
            )
    if size is None and mean is None and std is None:
        return base
    return Preprocessing(
        size=_pair(size) if size is not None else base.size,
        mean=tuple(float(m) for m in mean) if mean is not None else base.mean,
        std=tuple(float(s) for s in std) if std is not None else base.std,
        crop_pct=base.crop_pct,
        interpolation=base.interpolation if base.interpolation in _FILTERS else "bilinear",
        source=source or "explicit",
    )


def list_images(source: Source) -> list[Path]:
    """Image files of a folder (searched recursively, sorted) or the given files, as paths.

    Raises:
        ValueError: a folder that does not exist or holds no image, a file that does not exist.
    """
    if isinstance(source, (str, PathLike)):
        root = Path(source).expanduser()
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise ValueError(f"Image folder {str(root)!r} does not exist.")
        paths = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not paths:
            raise ValueError(f"No images ({', '.join(IMAGE_SUFFIXES)}) found in {str(root)!r}.")
        return paths
    paths = [Path(p).expanduser() for p in source]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"Image file(s) not found: {', '.join(missing[:5])}")
    if not paths:
        raise ValueError("No image files given.")
    return paths


def load_images(
    source: Source,
    model: nn.Module | None = None,
    *,
    size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    transform: Callable[[Any], torch.Tensor] | None = None,
    max_images: int | None = None,
    mode: str = "RGB",
) -> torch.Tensor:
    """A probe batch ``(N, C, H, W)`` from image files, preprocessed as ``model`` expects.

    Args:
        source: a folder (searched recursively, files sorted by path), one file, or a list
            of files.
        model: a timm model supplies its data config (size, interpolation, crop, mean, std).
        size: output size, an int or ``(height, width)``.
        mean: per-channel mean (after scaling pixels to ``[0, 1]``).
        std: per-channel standard deviation.
        transform: ``PIL.Image -> Tensor (C, H, W)`` used as it is, e.g. a torchvision
            ``weights.transforms()``.
        max_images: read at most this many files (the first ones).
        mode: Pillow mode images are converted to (``"RGB"``, or ``"L"`` for 1 channel).

    Returns:
        A float32 CPU tensor (:func:`preprocessing_for` with the same arguments tells the
        preprocessing used).

    Raises:
        ValueError: no images, an unreadable file, images of different sizes after the
            transform.

    Examples:
        >>> import tempfile, PIL.Image
        >>> d = tempfile.mkdtemp()
        >>> PIL.Image.new("RGB", (40, 30), (255, 0, 0)).save(f"{d}/red.png")
        >>> x = load_images(d, size=16, mean=(0, 0, 0), std=(1, 1, 1))
        >>> x.shape, x[0, :, 8, 8].tolist()
        (torch.Size([1, 3, 16, 16]), [1.0, 0.0, 0.0])
    """
    from PIL import Image, UnidentifiedImageError

    prep = preprocessing_for(model, size=size, mean=mean, std=std, transform=transform)
    paths = list_images(source)
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        paths = paths[:max_images]
    batch = []
    for path in paths:
        try:
            with Image.open(path) as image:
                tensor = prep(image.convert(mode))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"Cannot read image {str(path)!r}: {exc}") from None
        batch.append(tensor)
    shapes = {tuple(t.shape) for t in batch}
    if len(shapes) > 1:
        raise ValueError(
            f"The transform gave images of different shapes {sorted(shapes)}: give a size."
        )
    return torch.stack(batch)
