"""The images a command probes with: ``--images DIR`` preprocessed as the model expects,
seeded noise, or a ``.npy`` array (``--input``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erf_monitor.cli.args import floats, parse_size
from erf_monitor.cli.errors import CLIError, one_line

if TYPE_CHECKING:
    import torch

__all__ = ["load_images", "load_inputs", "load_probe_inputs"]


def load_images(
    args: argparse.Namespace, model: Any, spec: str
) -> tuple[torch.Tensor, str, dict[str, Any]]:
    """The first ``--samples`` images of ``--images``, preprocessed by ``--size/--mean/--std``
    or as ``spec``'s model expects; with their description and the preprocessing's."""
    from erf_monitor.cli.models import spec_preprocessing
    from erf_monitor.inputs.images import list_images, preprocessing_for
    from erf_monitor.inputs.images import load_images as read_images

    size = parse_size(args.size, "--size") if args.size else None
    if size is not None and len(size) != 2:
        raise CLIError(f"--size must be N or HxW for images, got {args.size!r}")
    mean, std = floats(args.mean, "--mean"), floats(args.std, "--std")
    if size is None and mean is None and std is None:
        prep = spec_preprocessing(spec, model)
    else:
        prep = preprocessing_for(model, size=size, mean=mean, std=std)
    try:
        paths = list_images(args.images)[: args.samples]
        x = read_images(paths, transform=prep)
    except (ValueError, TypeError) as exc:
        raise CLIError(one_line(exc)) from None
    return x, f"{len(paths)} images from {args.images}", prep.describe()


def load_inputs(args: argparse.Namespace, size: tuple[int, ...]) -> tuple[torch.Tensor, str]:
    """``--input``: seeded noise of ``size``, or the first ``--samples`` of a ``.npy`` array
    (read without pickle); with its description."""
    import numpy as np
    import torch

    if args.input == "noise":
        gen = torch.Generator().manual_seed(args.seed)
        shape = (args.samples, args.channels, *size)
        return torch.randn(shape, generator=gen), "noise"
    path = Path(args.input)
    if path.suffix != ".npy":
        raise CLIError(f"--input must be 'noise' or a .npy file, got {args.input!r}")
    if not path.is_file():
        raise CLIError(f"--input file {str(path)!r} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # pickled object arrays, corrupt files
        raise CLIError(f"cannot read {str(path)!r} as a plain .npy array: {exc}") from None
    if not np.issubdtype(arr.dtype, np.number):
        raise CLIError(f"{str(path)!r} holds {arr.dtype} data, not numbers")
    if arr.ndim == 2:  # (H, W)
        arr = arr[None, None]
    elif arr.ndim == 3:  # (C, H, W)
        arr = arr[None]
    if arr.ndim not in (3, 4, 5):
        raise CLIError(
            f"{str(path)!r} has shape {arr.shape}; expected (N, C, H, W), (C, H, W) or (H, W)"
        )
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[: args.samples]
    return x, str(path)


def load_probe_inputs(
    args: argparse.Namespace, model: Any, spec: str, size: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, str, dict[str, Any] | None]:
    """The probe images, their description and their preprocessing (``None`` without
    ``--images``): :func:`load_images` when ``--images`` is given, else :func:`load_inputs`
    (``size``: ``--input-size`` read when not given)."""
    if args.images is not None:
        return load_images(args, model, spec)
    x, source = load_inputs(args, parse_size(args.input_size) if size is None else size)
    return x, source, None
