"""Reading and checking the shared options' values (the options of :mod:`.options`): each
mistake a :class:`~erf_monitor.cli.errors.CLIError` that names the option."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from erf_monitor.cli.errors import CLIError, one_line

__all__ = [
    "check_device",
    "check_probe_inputs",
    "floats",
    "layer_spec",
    "parse_position",
    "parse_size",
]


def parse_size(text: str, flag: str = "--input-size") -> tuple[int, ...]:
    """``N``, ``HxW`` (or up to 3 sizes) as a tuple of sizes; ``N`` is ``N x N``."""
    parts = [p for p in text.replace(",", "x").lower().split("x") if p]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise CLIError(f"{flag} must be N or HxW (e.g. 224 or 224x160), got {text!r}") from None
    if not sizes or len(sizes) > 3 or any(s < 1 for s in sizes):
        raise CLIError(f"{flag} must be N or HxW with positive sizes, got {text!r}")
    return sizes * 2 if len(sizes) == 1 else sizes


def layer_spec(values: Sequence[str]) -> str | list[str]:
    """``--layers``' values (comma- or space-separated) as names, or ``"auto"``."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if not names or names == ["auto"]:
        return "auto"
    return names


def floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    """``--mean``/``--std``: 1 or 3 comma-separated numbers (``None`` when not given)."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise CLIError(
            f"{flag} must be comma-separated numbers (e.g. 0.5,0.5,0.5), got {text!r}"
        ) from None
    if len(values) not in (1, 3):
        raise CLIError(f"{flag} needs 1 or 3 values (images are read as RGB), got {text!r}")
    return values


def parse_position(text: str, dims: int | None = None) -> Any:
    """``--position``'s probe positions; with ``dims``, also checked against an output of that
    many spatial dimensions."""
    from erf_monitor.targets.positions import parse_position_text, request

    try:
        position = parse_position_text(text)
        if dims is not None:
            request(position, dims)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"--position: {one_line(exc)}") from None
    return position


def check_device(text: str) -> str:
    """``--device`` checked before anything is loaded: a device torch knows, and that this
    machine has; the error says which ones it has."""
    import torch

    available = ["cpu"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        available += ["cuda"] + [f"cuda:{i}" for i in range(n)]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        available.append("mps")
    have = ", ".join(available)
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {text!r} is not a torch device; available here: {have}") from None
    if dev.type == "cpu" or text in available:
        return text
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) was built without CUDA"
            if torch.version.cuda is None
            else "torch finds no NVIDIA GPU or driver here"
        )
        raise CLIError(f"--device {text}: {why}; use --device cpu (available here: {have})")
    raise CLIError(f"--device {text} is not available on this machine; available here: {have}")


def check_probe_inputs(args: argparse.Namespace) -> None:
    """The checks of the options of :func:`~erf_monitor.cli.options.add_probe_options` and
    ``--images``."""
    if args.samples < 1:
        raise CLIError(f"--samples must be >= 1, got {args.samples}")
    if args.images is not None and args.input != "noise":
        raise CLIError("give either --images DIR or --input FILE, not both")
    if args.images is None and (args.size or args.mean or args.std):
        raise CLIError("--size/--mean/--std preprocess --images; for noise use --input-size")
