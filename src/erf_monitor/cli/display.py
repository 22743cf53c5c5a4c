"""What the commands print: the rich consoles, the results and positions tables, warnings and
the preprocessing line."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from erf_monitor.measure.result import ERFResult

__all__ = [
    "POSITIONS_LEGEND",
    "RATIO_NOTE",
    "lit",
    "number_text",
    "positions_table",
    "print_preprocessing",
    "print_warnings",
    "results_table",
    "rich_console",
    "trf_text",
    "write_positions",
]


def rich_console(stderr: bool = False, quiet: bool = False) -> Console:
    """A rich console on stdout (or stderr); pipes and captured output get 120 columns."""
    from rich.console import Console

    out = Console(stderr=stderr, quiet=quiet)
    if not out.is_terminal:  # pipes and captured output: do not squeeze tables to 80 cols
        out = Console(stderr=stderr, quiet=quiet, width=max(out.width, 120))
    return out


def lit(value: object) -> str:
    """``value`` as text that rich prints as given: names and paths are never markup
    (``net[/]`` would end a style, ``exp[lr=0.1]`` would vanish)."""
    from rich.markup import escape

    return escape(str(value))


def number_text(value: float, spec: str = ".3f") -> str:
    """``value`` formatted by ``spec``; ``n/a`` when it is not finite."""
    return "n/a" if not math.isfinite(value) else format(value, spec)


def trf_text(r: ERFResult) -> tuple[str, str]:
    """The TRF and clipped TRF columns of ``r``'s row."""
    trf = r.trf
    if trf is None:
        return "?", "?"
    if trf.data_dependent:
        return "data-dependent", "-"
    return trf.size_text(), trf.clipped_text()


def results_table(
    results: Mapping[str, ERFResult],
    *,
    title: str | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> Table:
    """A rich table: layer, output shape, TRF (and clipped TRF), ERF size, ratio, coverage, sigma.

    Args:
        results: ``compute_erf``'s mapping ``layer -> ERFResult``.
        title: table title.
        thresholds: ``{layer: min_coverage}``; coverages below their threshold are shown red.

    Returns:
        A ``rich.table.Table``.
    """
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("layer", style="cyan", no_wrap=True)
    table.add_column("output", justify="right")
    table.add_column("TRF", justify="right")
    table.add_column("TRF clipped", justify="right")
    table.add_column("ERF (95%)", justify="right")
    table.add_column("ERF/TRF", justify="right")
    table.add_column("coverage", justify="right")
    table.add_column("sigma y, x", justify="right")
    thresholds = thresholds or {}
    from rich.markup import escape

    for name, r in results.items():
        size, clipped = trf_text(r)
        cov = r.coverage
        cov_text = f"{cov:.1%}"
        if name in thresholds:
            ok = cov >= thresholds[name]
            cov_text = (
                f"[{'green' if ok else 'bold red'}]{cov_text}[/] (min {thresholds[name]:.0%})"
            )
        table.add_row(
            escape(name or "<model>"),
            "x".join(str(s) for s in r.output_shape) or "-",
            size,
            clipped,
            str(r.erf_size),
            number_text(r.ratio, ".2f"),
            cov_text,
            ", ".join(number_text(s, ".1f") for s in r.sigma),
        )
    if any(math.isfinite(r.ratio) and r.ratio > 1 for r in results.values()):
        table.caption = RATIO_NOTE
        table.caption_justify = "left"
    return table


#: Under a table with an ERF/TRF ratio above 1 (docs/concepts.md defines both sizes).
RATIO_NOTE = (
    "ERF/TRF above 1: the 95%-mass square has an odd side centred on the unit's centre pixel, "
    "so when the TRF is only a few pixels or cut by the image edge that square reaches past "
    "it (e.g. 5 px over a 4 px clipped TRF): the input is too small to tell the two apart."
)


def print_warnings(caught: Sequence[Any], err: Console) -> None:
    """The probe's own warnings as one ``warning:`` line each; others issued again as they were."""
    import warnings

    from rich.markup import escape

    from erf_monitor.core.errors import ERFProbeWarning

    for w in caught:
        if issubclass(w.category, ERFProbeWarning):
            text = " ".join(str(w.message).split())
            err.print(f"[yellow]warning[/]: {escape(text)}", highlight=False)
        else:
            warnings.warn(w.message, w.category, stacklevel=2)


def print_preprocessing(out: Console, preprocessing: Mapping[str, Any]) -> None:
    """One line: how ``--images`` were preprocessed (size, mean, std and who said so)."""
    out.print(
        f"Images preprocessed by {lit(preprocessing['source'])}: "
        f"{'x'.join(map(str, preprocessing['size']))} px, mean {preprocessing['mean']}, "
        f"std {preprocessing['std']}.",
        highlight=False,
    )


#: What the positions table's columns mean, printed under it (docs/concepts.md defines them).
POSITIONS_LEGEND = (
    "unit: the output index; centre px: its input pixel; ERF: side of the 95%-mass square (px); "
    "visible: that side as the image clips it; coverage: the square's share of the image; "
    "of TRF: its share of the unit's clipped TRF; offset y,x: centroid minus centre pixel (px); "
    "aniso.: widest over narrowest Gaussian width (1: round); dead: share of the TRF's pixels "
    "with zero gradient (gridding); border_ratio: corner units' visible ERF size over the "
    "centre's (0.5: corners reach as far as the centre, below: padding shrinks them). "
    "Definitions: docs/concepts.md."
)


def positions_table(results: Mapping[str, ERFResult], *, title: str | None = None) -> Table:
    """A rich table of every probed position of every layer (``compute_erf(position=...)``)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title=title,
        title_justify="left",
        header_style="bold",
        caption=POSITIONS_LEGEND,
        caption_justify="left",
    )
    for col in ("layer", "position"):
        table.add_column(col, style="cyan" if col == "layer" else None, no_wrap=True)
    for col in ("unit", "centre px", "ERF", "visible", "coverage", "of TRF", "offset y,x",
                "aniso.", "dead"):  # fmt: skip
        table.add_column(col, justify="right", no_wrap=True)
    for name, r in results.items():
        rows = list(r.field.values()) if r.field is not None else [r]
        for x in rows:
            table.add_row(
                escape(name or "<model>"),
                escape(x.position),
                ",".join(map(str, x.output_index)) or "-",
                ",".join(map(str, x.centre_pixel)),
                str(x.erf_size),
                number_text(x.visible_size, ".1f"),
                f"{x.coverage:.1%}",
                "n/a" if math.isnan(x.coverage_trf) else f"{x.coverage_trf:.1%}",
                ",".join(number_text(o, "+.1f") for o in x.centroid_offset),
                number_text(x.anisotropy, ".2f"),
                "n/a" if math.isnan(x.dead_fraction) else f"{x.dead_fraction:.0%}",
            )
        if r.field is not None:
            ratio = r.field.border_ratio
            table.add_row(escape(name), "[i]border_ratio[/]", "", "", "", number_text(ratio, ".2f"))
    return table


def write_positions(
    results: Mapping[str, ERFResult], out: Path, console: Console, title: str, fmt: str = "png"
) -> None:
    """The positions table, and each 2-D field's figure as ``fields/<layer>.<fmt>``."""
    if all(r.position == "centre" and r.field is None for r in results.values()):
        return
    console.print(positions_table(results, title=title))
    from erf_monitor.sinks import safe_filename

    for name, r in results.items():
        if r.field is not None and r.heatmap.dim() == 2:
            from erf_monitor.viz.export import save_figure

            path = save_figure(r.field.figure(), out / "fields" / f"{safe_filename(name)}.{fmt}")
            console.print(f"ERF field of {lit(repr(name))}: [bold]{lit(path)}[/]", highlight=False)
