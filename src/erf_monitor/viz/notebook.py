"""Notebook display: pictures as PNG bytes and small HTML blocks (inline PNGs, tables).

Jupyter shows an object through its ``_repr_html_`` / ``_repr_png_`` methods; the result
types (:mod:`erf_monitor.measure.display`) build theirs from these pieces. Everything here is
plain HTML with inline styles (no scripts, no external files), so a saved notebook shows the
same thing anywhere; every name is escaped.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["figure_png", "image_tag", "png_bytes", "table_html"]

_CELL = "padding:2px 8px;border-bottom:1px solid #ddd;"


def png_bytes(image: np.ndarray) -> bytes:
    """An ``(H, W, 3)`` uint8 RGB image encoded as PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """A matplotlib figure rendered as PNG (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def image_tag(png: bytes, alt: str, width: int | None = None) -> str:
    """An ``<img>`` with the PNG inline (a data URI)."""
    data = base64.b64encode(png).decode("ascii")
    size = f' width="{int(width)}"' if width else ""
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"{size}/>'


def table_html(
    header: Sequence[str] | None,
    rows: Sequence[Sequence[str]],
    *,
    caption: str | None = None,
) -> str:
    """A plain HTML table of text cells (escaped); the first column is left-aligned, the
    others right-aligned (numbers)."""

    def cells(values: Sequence[str], tag: str) -> str:
        out = []
        for i, v in enumerate(values):
            align = "left" if i == 0 else "right"
            out.append(f'<{tag} style="{_CELL}text-align:{align}">{html.escape(str(v))}</{tag}>')
        return "<tr>" + "".join(out) + "</tr>"

    parts = ['<table style="border-collapse:collapse;font-size:12px;margin:4px 0">']
    if caption:
        parts.append(
            f'<caption style="caption-side:top;text-align:left;font-weight:bold">'
            f"{html.escape(caption)}</caption>"
        )
    if header:
        parts.append("<thead>" + cells(header, "th") + "</thead>")
    parts.append("<tbody>" + "".join(cells(r, "td") for r in rows) + "</tbody></table>")
    return "".join(parts)
