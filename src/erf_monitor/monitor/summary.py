"""The end-of-training summary table printed by ``ERFMonitor`` and ``watch``.

One row per watched layer: the clipped TRF, the ERF size, ERF/TRF ratio and coverage at the
first and at the last probe, and the step at which the layer's coverage alert fired (with its
``min_coverage``; layers without a threshold are "not checked"). Built from ``history``
alone, so it is the same table after a resume from a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = ["print_summary", "summary_table"]

History = Mapping[str, Mapping[int, Mapping[str, float]]]

_COLUMNS: tuple[tuple[str, Literal["left", "right"], str | None], ...] = (
    ("layer", "left", "cyan"),
    ("TRF", "right", None),
    ("ERF", "right", None),
    ("ERF/TRF", "right", None),
    ("coverage", "right", None),
    ("alert", "left", None),
)
_MIN_LAYER_WIDTH = 8
#: What the columns hold, under the table.
CAPTION = (
    "first → last probe. TRF, ERF: sides in px (TRF clipped to the input, ERF the 95%-mass "
    "square); coverage: the square's share of the input; alert: the step it fired at "
    "(min_coverage)."
)


def _fmt(value: float | None, spec: str) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return format(value, spec)


def _first_last(by_step: Mapping[int, Mapping[str, float]], key: str, spec: str) -> str:
    steps = sorted(by_step)
    first = by_step[steps[0]].get(key)
    last = by_step[steps[-1]].get(key)
    if len(steps) == 1:
        return _fmt(last, spec)
    return f"{_fmt(first, spec)} → {_fmt(last, spec)}"


def summary_table(
    history: History,
    alerts: Mapping[str, int] | None = None,
    thresholds: Mapping[str, float] | None = None,
    *,
    title: str = "erf-monitor: ERF over training",
) -> Table:
    """A ``rich`` table of ``history`` (``{layer: {step: {metric: value}}}``).

    Args:
        history: what ``monitor.history`` holds.
        alerts: ``{layer: step}`` of the coverage alerts that fired (``monitor.alerts``).
        thresholds: ``{layer: min_coverage}`` of the checked layers.
        title: the table's title.

    Returns:
        The table; ``rich.console.Console().print(table)`` shows it.

    Examples:
        >>> from rich.console import Console
        >>> hist = {"layer4": {0: {"erf_size": 41.0, "erf_trf_ratio": 0.2, "coverage": 0.03},
        ...                    500: {"erf_size": 97.0, "erf_trf_ratio": 0.45, "coverage": 0.19}}}
        >>> console = Console(width=120, color_system=None)
        >>> with console.capture() as cap:
        ...     console.print(summary_table(hist, {}, {"layer4": 0.05}))
        >>> "41 → 97" in cap.get() and "3.0% → 19.0%" in cap.get()
        True
    """
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    alerts = alerts or {}
    thresholds = thresholds or {}
    steps = sorted({s for by_step in history.values() for s in by_step})
    if steps:
        span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]} → {steps[-1]}"
        title = f"{title} ({span}, {len(steps)} probe{'s' if len(steps) > 1 else ''})"
    table = Table(
        title=title,
        title_justify="left",
        header_style="bold",
        caption=CAPTION,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
    )
    # One-word headers, each column at least as wide as its header: a narrow console wraps
    # the cells (at " → ") and folds long layer names, it never cuts a header to "ERF…".
    for header, justify, style in _COLUMNS:
        min_width = None if header == "layer" else len(header)
        table.add_column(header, justify=justify, style=style, min_width=min_width, overflow="fold")
    for layer, by_step in history.items():
        if not by_step:
            continue
        last = by_step[max(by_step)]
        trf_text = _fmt(last.get("trf_size_clipped"), ".0f")
        if last.get("trf_global", 0.0) > 0:
            trf_text += " (global)"
        if layer in alerts:
            alert = f"[bold red]step {alerts[layer]}[/] ({thresholds.get(layer, math.nan):.0%})"
        elif layer in thresholds:
            alert = f"[green]none[/] ({thresholds[layer]:.0%})"
        else:
            alert = "[dim]not checked[/]"
        table.add_row(
            escape(layer or "<model>"),
            trf_text,
            _first_last(by_step, "erf_size", ".0f"),
            _first_last(by_step, "erf_trf_ratio", ".2f"),
            _first_last(by_step, "coverage", ".1%"),
            alert,
        )
    return table


def print_summary(
    history: History,
    alerts: Mapping[str, int] | None = None,
    thresholds: Mapping[str, float] | None = None,
    *,
    console: Console | None = None,
) -> None:
    """Print :func:`summary_table` (nothing when nothing was probed)."""
    if not any(history.values()):
        return
    from rich.console import Console
    from rich.measure import Measurement

    table = summary_table(history, alerts, thresholds)
    natural = Measurement.get(Console(), Console().options.update_width(10_000), table).maximum
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file or a pipe: every row on one line
            console = Console(width=max(console.width, natural))
    excess = natural - console.width
    if excess > 0:
        # A long layer name folds onto more lines instead of squeezing the numbers: rich
        # counts an unbreakable name as its column's minimum and would crop the table.
        longest = max(len(layer or "<model>") for layer in history)
        table.columns[0].max_width = max(_MIN_LAYER_WIDTH, longest - excess)
    console.print(table)
    if alerts:
        console.print("Alerts: monitor.alerts == {layer: step it fired at}.", highlight=False)
