"""``erf-monitor demo``: a small-RF and a large-RF CNN trained on a task that needs a large
ERF (:func:`erf_monitor.cli.demo.run_demo`)."""

from __future__ import annotations

import argparse
from typing import Any

from erf_monitor.cli.display import rich_console
from erf_monitor.cli.options import add_command

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """The ``demo`` command and its options."""
    demo = add_command(
        subparsers,
        "demo",
        help="train a small-RF and a large-RF CNN on a task that needs a large ERF (CPU, minutes)",
        description=(
            "Train two small CNNs on a synthetic task (brighter or darker? a faint shift of "
            "every pixel of 128x128 noise) read out at the centre unit, which must average over "
            "a large region around the centre: the 'large' variant (dilated residual blocks) "
            "grows its ERF from 7 to 115-117 px (seed 0, 200 steps; the torch build moves the "
            "last digits) and learns the task; the "
            "'small' one (no dilation, TRF 71 px) cannot cover enough of the image and gets "
            "the coverage alert. ERFMonitor logs to TensorBoard, W&B or CSV files and writes "
            "every heatmap as a PNG file; a table and an HTML report follow."
        ),
    )
    demo.add_argument(
        "--variant", choices=("small", "large", "both"), default="both", help="what to train"
    )
    demo.add_argument(
        "--logger",
        choices=("tensorboard", "wandb", "csv"),
        default="tensorboard",
        help="where ERFMonitor logs (wandb runs offline unless W&B is configured)",
    )
    demo.add_argument("--out", default="erf_demo_logs", help="log directory")
    demo.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per variant (default: 200; --fast: 8)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seeds data, weights and shuffling")
    demo.add_argument("--fast", action="store_true", help="a few steps only (for tests)")
    demo.add_argument("--threads", type=int, default=1, help="torch threads for training")
    demo.add_argument("--no-report", action="store_true", help="skip the HTML report")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train the demo's variants and print their summary."""
    from erf_monitor.cli.demo import run_demo

    run_demo(
        variant=args.variant,
        out=args.out,
        logger=args.logger,
        fast=args.fast,
        steps=args.steps,
        seed=args.seed,
        report=not args.no_report,
        threads=args.threads,
        console=rich_console(),
    )
    return 0
