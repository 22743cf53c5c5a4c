"""``erf-monitor report``: one self-contained HTML page from the runs under a folder
(:func:`erf_monitor.cli.report.build_report`)."""

from __future__ import annotations

import argparse
from typing import Any

from erf_monitor.cli.display import lit, rich_console
from erf_monitor.cli.options import add_command

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """The ``report`` command and its options."""
    report = add_command(
        subparsers,
        "report",
        help="one self-contained HTML page from ERFMonitor logs and analyze outputs",
        description=(
            "Find every run under LOGDIR (FileSink directories with metrics.csv, CSVLogger's "
            "erf/ folders, TensorBoard event files, 'erf-monitor analyze --out' folders) and "
            "write one HTML page: runs side by side (one plot per layer they share), then per "
            "run growth curves of ERF size, ERF/TRF ratio and coverage (with min_coverage or a "
            "reference line) and heatmap filmstrips. Runs with identical ERF data are shown "
            "once. Nothing outside LOGDIR is read: symbolic links out of it are ignored."
        ),
    )
    report.add_argument("logdir", metavar="LOGDIR", help="folder to search")
    report.add_argument("--out", default=None, help="HTML file (default: LOGDIR/erf_report.html)")
    report.add_argument("--frames", type=int, default=8, help="heatmaps per filmstrip")
    report.add_argument("--title", default=None, help="page title (default: from LOGDIR)")
    report.add_argument(
        "--min-coverage",
        type=float,
        default=0.05,
        help="reference line on coverage plots of runs that logged no min_coverage",
    )
    report.add_argument(
        "--keep-duplicates", action="store_true", help="show runs with identical data each"
    )
    report.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the report and say where it is."""
    from erf_monitor.cli.report import build_report

    path, runs = build_report(
        args.logdir,
        args.out,
        max_frames=args.frames,
        title=args.title,
        reference_coverage=args.min_coverage,
        dedupe=not args.keep_duplicates,
    )
    rich_console().print(
        f"Report of {len(runs)} run(s) written to [bold]{lit(path)}[/] "
        f"({path.stat().st_size / 1024:.0f} KiB, self-contained: open it in any browser).",
        highlight=False,
    )
    return 0
