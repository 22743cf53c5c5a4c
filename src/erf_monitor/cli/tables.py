"""RepLKNet-style tables of ``erf-monitor analyze`` results: ``table.md`` and ``table.tex``.

One row per model and layer: the area ratios a(t) at t = 20, 30, 50 and 99 % (RepLKNet
Table 10's thresholds: the share of the input area inside the smallest centred square that
holds fraction t of the ERF's mass), the ERF size m(0.95) in pixels and the coverage a(0.95).
Ratios are percentages. With bootstrap intervals, each value carries its interval: ``0.52
(0.48–0.57)`` in Markdown, ``$0.52^{+0.05}_{-0.04}$`` in LaTeX (BCa intervals are not
symmetric, so both ends are given). The LaTeX table rounds to significant digits (values to 3,
an interval's larger side to 2 and the value to the same place; an interval that rounds to
zero is left out) and spaces its rows (``\arraystretch``) so that the scripts do not touch.

Tables are built from the records that ``analyze`` writes (``metrics.json``), so a table of a
resumed batch (``--skip-existing``) is the table of an uninterrupted one.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "COLUMNS",
    "Row",
    "caption",
    "latex_table",
    "markdown_table",
    "rich_table",
    "rows_of",
    "tex_number",
    "write_tables",
]

#: ``(metric key, Markdown header, LaTeX header, percent?)`` of every column after model/layer.
COLUMNS: tuple[tuple[str, str, str, bool], ...] = (
    ("area_t20", "a(20%) %", r"$a(20\%)$", True),
    ("area_t30", "a(30%) %", r"$a(30\%)$", True),
    ("area_t50", "a(50%) %", r"$a(50\%)$", True),
    ("area_t99", "a(99%) %", r"$a(99\%)$", True),
    ("erf_size", "ERF size (px)", "ERF (px)", False),
    ("coverage", "coverage %", r"coverage (\%)", True),
)
TABLE_FORMATS: dict[str, str] = {"md": "table.md", "latex": "table.tex"}
_METHODS = {"bca": "BCa", "percentile": "percentile"}


@dataclass
class Row:
    """One model's layer: its metric values and, with bootstrap, their intervals."""

    model: str
    layer: str
    values: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)


def _float(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def rows_of(model: str, record: Mapping[str, Any]) -> list[Row]:
    """The rows of one ``analyze`` record (``metrics.json``): its layers' centre units."""
    rows = []
    for layer, rec in record.get("layers", {}).items():
        metrics = rec.get("metrics", {})
        row = Row(model, layer, {k: _float(metrics.get(k)) for k, *_ in COLUMNS})
        for k, ci in (rec.get("intervals") or {}).items():
            row.intervals[k] = (_float(ci.get("low")), _float(ci.get("high")))
        rows.append(row)
    return rows


def _scaled(key: str, v: float) -> float:
    percent = next(p for k, *_, p in COLUMNS if k == key)
    return 100.0 * v if percent else v


def _spec(key: str) -> str:
    return ".0f" if key == "erf_size" else ".2f"


def _md_cell(row: Row, key: str) -> str:
    v = row.values.get(key, math.nan)
    if not math.isfinite(v):
        return "n/a"
    spec = _spec(key)
    text = format(_scaled(key, v), spec)
    lo, hi = row.intervals.get(key, (math.nan, math.nan))
    if math.isfinite(lo) and math.isfinite(hi):
        text += f" ({_scaled(key, lo):{spec}}–{_scaled(key, hi):{spec}})"
    return text


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")


def markdown_table(rows: Sequence[Row], caption: str = "") -> str:
    """A Markdown (GitHub) table, the caption as a paragraph above it."""
    header = ["model", "layer", *[h for _, h, _, _ in COLUMNS]]
    lines = [caption, ""] if caption else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| --- | --- |" + " ---: |" * len(COLUMNS))
    for row in rows:
        cells = [_md_escape(row.model), f"`{_md_escape(row.layer or '<model>')}`"]
        cells += [_md_cell(row, k) for k, *_ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    r"""Text safe inside a LaTeX tabular cell.

    Examples:
        >>> latex_escape("layer1_0 & 50%")
        'layer1\\_0 \\& 50\\%'
    """
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def _decimals(x: float, digits: int) -> int:
    """Decimal places that show ``x`` with ``digits`` significant digits (at most 4)."""
    if x == 0 or not math.isfinite(x):
        return 0
    return min(4, max(0, digits - 1 - math.floor(math.log10(abs(x)))))


def _plain(x: float, places: int) -> str:
    return "0" if round(x, places) == 0 else f"{x:.{places}f}"


def tex_number(
    value: float, low: float = math.nan, high: float = math.nan, *, px: bool = False
) -> str:
    r"""A LaTeX cell rounded to significant digits: the value to 3, or, with an interval,
    its larger side to 2 and the value to the same place; pixels are whole numbers.

    Examples:
        >>> tex_number(11.2857), tex_number(0.1534), tex_number(95.37, 95.37, 95.37)
        ('11.3', '0.153', '95.4')
        >>> tex_number(45.14, 41.04, 45.14), tex_number(31.0, 29.0, 31.0, px=True)
        ('$45.1^{+0}_{-4.1}$', '$31^{+0}_{-2}$')
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{value:.0f}" if px else f"{value:.{_decimals(value, 3)}f}"
    up, down = max(high - value, 0.0), max(value - low, 0.0)
    places = 0 if px else _decimals(max(up, down), 2)
    if round(up, places) == 0 and round(down, places) == 0:
        return tex_number(value, px=px)  # no interval worth printing: the value alone
    return f"${value:.{places}f}^{{+{_plain(up, places)}}}_{{-{_plain(down, places)}}}$"


def _tex_cell(row: Row, key: str) -> str:
    v = row.values.get(key, math.nan)
    if not math.isfinite(v):
        return "n/a"
    lo, hi = row.intervals.get(key, (math.nan, math.nan))
    low, high = _scaled(key, lo), _scaled(key, hi)
    return tex_number(_scaled(key, v), low, high, px=key == "erf_size")


def latex_table(rows: Sequence[Row], caption: str = "") -> str:
    """A LaTeX ``tabular`` (no package needed: ``\\hline`` rules), the caption as ``%``
    comments above it; a model's name is written on its first row only."""
    lines = [f"% {line}" for line in textwrap.wrap(caption, 96)]
    # Room between the rows (interval scripts) and the columns; local to the table.
    lines.append(r"{\renewcommand{\arraystretch}{1.35}\setlength{\tabcolsep}{7pt}")
    lines.append(r"\begin{tabular}{ll" + "r" * len(COLUMNS) + "}")
    lines.append(r"\hline")
    lines.append(" & ".join(["Model", "Layer", *[h for _, _, h, _ in COLUMNS]]) + r" \\")
    lines.append(r"\hline")
    previous = None
    for row in rows:
        if previous is not None and row.model != previous:
            lines.append(r"\hline")
        name = latex_escape(row.model) if row.model != previous else ""
        layer = r"\texttt{" + latex_escape(row.layer or "<model>") + "}"
        lines.append(" & ".join([name, layer, *[_tex_cell(row, k) for k, *_ in COLUMNS]]) + r" \\")
        previous = row.model
    lines.append(r"\hline")
    lines.append(r"\end{tabular}}")
    return "\n".join(lines) + "\n"


def caption(record: Mapping[str, Any], models: int = 1) -> str:
    """What the table measures, from an ``analyze`` record (mode, images, intervals)."""
    shape = record.get("input_shape") or []
    images = f"{shape[0]} probe image(s) of {'x'.join(map(str, shape[1:]))}" if shape else "?"
    weights = record.get("weights", "random init")
    text = (
        "ERF area ratios a(t): % of the input area inside the smallest centred square holding "
        "fraction t of the ERF's mass (RepLKNet Table 10); ERF size m(0.95) in px; coverage "
        f"a(0.95). Mode {record.get('mode', '?')}, {images} ({record.get('input', '?')}), "
        f"{weights if weights == 'random init' else 'weights ' + str(weights)}"
        + (f", {models} models" if models > 1 else "")
        + "."
    )
    boot = record.get("bootstrap")
    if boot:
        text += (
            f" Intervals: {round(100 * boot['level'])}% {_METHODS.get(boot['method'], '')} "
            "bootstrap over "
            f"the probe images, {boot['n_boot']} resamples."
        )
    return text


def write_tables(
    rows: Sequence[Row], out: Path, formats: Sequence[str], caption: str = ""
) -> list[Path]:
    """Write ``table.md`` and/or ``table.tex`` into ``out``; returns the paths."""
    paths = []
    for fmt in formats:
        text = markdown_table(rows, caption) if fmt == "md" else latex_table(rows, caption)
        path = Path(out) / TABLE_FORMATS[fmt]
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def rich_table(rows: Sequence[Row], title: str | None = None) -> Table:
    """The table on screen (``rich``): the values, a model's name on its first row (the
    intervals are in the files)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("model", style="cyan", no_wrap=True)
    table.add_column("layer", no_wrap=True)
    for _, header, _, _ in COLUMNS:
        table.add_column(header, justify="right")
    for i, row in enumerate(rows):
        first = i == 0 or rows[i - 1].model != row.model
        last = i + 1 == len(rows) or rows[i + 1].model != row.model
        plain = Row(row.model, row.layer, row.values)  # without intervals
        table.add_row(
            escape(row.model) if first else "",
            escape(row.layer or "<model>"),
            *[_md_cell(plain, k) for k, *_ in COLUMNS],
            end_section=last,
        )
    return table
