"""Figures written as PNG, PDF or SVG (``--format``), through matplotlib's own backends.

PDF and SVG are vector files: text, boxes, axes and colour bars are vector paths; the maps
themselves are embedded images (a heatmap is pixels). They are written without a creation
date and with fixed SVG ids, so the same figure gives the same bytes at every run (figures in
a paper's repository do not change when they are made again).
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FORMATS", "save_figure"]

#: Figure formats the command line writes.
FORMATS: tuple[str, ...] = ("png", "pdf", "svg")

_NO_DATE: dict[str, dict[str, Any]] = {
    "png": {},
    "pdf": {"CreationDate": None, "ModDate": None},
    "svg": {"Date": None},
}


def save_figure(fig: Figure, path: str | PathLike[str], dpi: int = 150) -> Path:
    """Save ``fig`` in the format its suffix names (``.png``, ``.pdf`` or ``.svg``).

    Args:
        fig: a matplotlib figure.
        path: destination; parent folders are created.
        dpi: resolution of PNG files and of the maps embedded in PDF/SVG.

    Returns:
        The path written.

    Raises:
        ValueError: for another suffix.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"figure format must be one of {', '.join(FORMATS)}, got {path.name!r}")
    import matplotlib

    path.parent.mkdir(parents=True, exist_ok=True)
    # SVG ids are salted with a random value unless a salt is given
    with matplotlib.rc_context({"svg.hashsalt": "erf-monitor"}):
        fig.savefig(path, format=fmt, dpi=dpi, metadata=_NO_DATE[fmt])
    return path
