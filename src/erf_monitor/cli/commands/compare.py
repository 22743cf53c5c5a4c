"""``erf-monitor compare``: several models or checkpoints probed on the same images, with
bootstrap intervals and paired differences to the first
(:func:`erf_monitor.cli.compare.compare_models`)."""

from __future__ import annotations

import argparse
import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from erf_monitor.cli.args import check_device, check_probe_inputs, layer_spec, parse_size
from erf_monitor.cli.display import lit, print_preprocessing, rich_console
from erf_monitor.cli.errors import CLIError, short_error
from erf_monitor.cli.options import (
    MODE_HELP,
    MODEL_HELP,
    add_command,
    add_figure_options,
    add_model_inputs,
    add_output_options,
    add_probe_options,
    add_run_options,
)

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from rich.console import Console
    from rich.progress import Progress
    from torch import nn

    from erf_monitor.cli.compare import Comparison, Steps

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """The ``compare`` command and its options."""
    compare = add_command(
        subparsers,
        "compare",
        help="several models or checkpoints on one probe set, with bootstrap intervals",
        description=(
            "Probe every MODEL[@CHECKPOINT] on the same images, print per layer ERF size, "
            "coverage, ERF/TRF ratio and sigma with bootstrap confidence intervals over the "
            "probe images, and the paired difference to the first model (bold when its "
            "interval excludes 0); write compare.png (maps side by side and difference "
            "maps), compare.json (every metric's interval) and maps.npz."
        ),
        epilog=MODEL_HELP.replace(
            "No weights",
            "  MODEL@CKPT               MODEL with the weights of CKPT (a state dict or a\n"
            "                           Lightning checkpoint; torch.load(weights_only=True))\n"
            "No weights",
        )
        + "\n"
        + MODE_HELP,
    )
    compare.add_argument("models", metavar="MODEL", nargs="+", help="see below")
    compare.add_argument("--names", default=None, help="comma-separated names (default: the specs)")
    add_probe_options(compare, samples=32, samples_help="probe images")
    add_model_inputs(
        compare,
        images="preprocessed as the first MODEL expects; the same images for every model",
        weights="weights of every MODEL given without @CKPT: alone, its",
        checkpoints="for checkpoints fine-tuned on N classes",
    )
    compare.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples")
    compare.add_argument("--level", type=float, default=0.95, help="interval coverage")
    compare.add_argument(
        "--method", choices=("bca", "percentile"), default="bca", help="bootstrap interval"
    )
    add_run_options(compare, seed_help="seeds model init, noise, resamples")
    add_figure_options(
        compare, log_scale_help="log colour scale", format_help="figure format (pdf, svg: vector)"
    )
    add_output_options(compare, out="erf_compare", out_help="output directory")
    compare.set_defaults(func=run)


def _check_options(args: argparse.Namespace) -> list[str]:
    """The options checked before anything is loaded; returns the models' names."""
    check_device(args.device)
    if args.samples < 2:
        raise CLIError(f"--samples must be >= 2 for intervals, got {args.samples}")
    if args.bootstrap < 2:
        raise CLIError(f"--bootstrap must be >= 2, got {args.bootstrap}")
    if not 0.0 < args.level < 1.0:
        raise CLIError(f"--level must be in (0, 1), got {args.level}")
    if args.num_classes is not None and args.num_classes < 1:
        raise CLIError(f"--num-classes must be >= 1, got {args.num_classes}")
    check_probe_inputs(args)
    names = [n.strip() for n in args.names.split(",")] if args.names else list(args.models)
    if len(names) != len(args.models):
        raise CLIError(f"--names has {len(names)} names for {len(args.models)} models")
    return names


def run(args: argparse.Namespace) -> int:
    """Build the models and the probe images, compare, write and print the outcome."""
    from erf_monitor.cli.compare import comparison_table, split_spec
    from erf_monitor.cli.probe_inputs import load_probe_inputs

    names = _check_options(args)
    size = parse_size(args.input_size)
    err = rich_console(stderr=True)
    live = err.is_terminal and not args.quiet
    t0 = time.perf_counter()
    with _progress(err, disable=not live) as display:
        steps = _steps(args, display, err, live)
        models = _build_models(args, names, steps)
        # preprocessed as the first model expects: the same images for every model
        first = split_spec(args.models[0])[0]
        x, source, preprocessing = load_probe_inputs(args, models[0][1], first, size)
        build_s = time.perf_counter() - t0
        if not live and not args.quiet:
            err.print(
                f"probing {len(models)} model(s) on {x.shape[0]} {lit(source)} image(s); "
                f"{args.bootstrap} bootstrap resamples per layer...",
                highlight=False,
            )
        comp = _compare(args, models, x, steps)
        t1 = time.perf_counter()
        paths = _write(args, comp, source, preprocessing, steps)
        write_s = time.perf_counter() - t1
    console = rich_console()
    if preprocessing is not None:
        print_preprocessing(console, preprocessing)
    console.print(comparison_table(comp))
    probe_s = sum(v for k, v in comp.seconds.items() if k.startswith("probe "))
    boot_s = sum(v for k, v in comp.seconds.items() if k.startswith("bootstrap "))
    console.print(
        f"Time: {time.perf_counter() - t0:.1f} s (models and images {build_s:.1f} s, probes "
        f"{probe_s:.1f} s, bootstrap {boot_s:.1f} s, outputs {write_s:.1f} s). Wrote "
        + ", ".join(f"[bold]{lit(p)}[/]" for p in paths.values())
        + ".",
        highlight=False,
    )
    return 0


def _progress(err: Console, disable: bool) -> AbstractContextManager[Progress]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=disable,
    )


def _steps(args: argparse.Namespace, display: Progress, err: Console, live: bool) -> Steps | None:
    """Where the steps are shown: the live display, one line each in logs and pipes, or
    nowhere (``--quiet``)."""
    from erf_monitor.cli.compare import LineSteps, RichSteps

    if live:
        return RichSteps(display)
    if not args.quiet:  # logs and pipes: one line per finished step
        return LineSteps(err)
    return None


def _build_models(
    args: argparse.Namespace, names: list[str], steps: Steps | None
) -> list[tuple[str, nn.Module]]:
    """Every MODEL[@CKPT], the same seeded initialisation for each, in eval mode."""
    import torch

    from erf_monitor.cli.compare import load_state, split_spec
    from erf_monitor.cli.models import load_model

    models = []
    for name, spec in zip(names, args.models):
        model_spec, ckpt = split_spec(spec)
        if steps is not None:
            steps.start(f"building {name}")
        with torch.random.fork_rng():  # the same initialisation for every spec, seeded
            torch.manual_seed(args.seed)
            model = load_model(
                model_spec,
                pretrained=args.pretrained if ckpt is None else None,
                num_classes=args.num_classes,
            )
        if ckpt is not None:
            load_state(model, ckpt)
        models.append((name, model.to(args.device).eval()))
        if steps is not None:
            steps.done()
    return models


def _compare(
    args: argparse.Namespace,
    models: list[tuple[str, nn.Module]],
    x: torch.Tensor,
    steps: Steps | None,
) -> Comparison:
    """The probes and bootstrap intervals of every model."""
    from erf_monitor.cli.compare import compare_models, split_spec
    from erf_monitor.core.errors import ERFProbeError

    try:
        return compare_models(
            models,
            x.to(args.device),
            layer_spec(args.layers),
            mode=args.mode,
            n_boot=args.bootstrap,
            level=args.level,
            method=args.method,
            seed=args.seed,
            chunk_size=args.chunk_size,
            progress=steps,
        )
    except (ValueError, TypeError, ERFProbeError) as exc:
        raise CLIError(short_error(exc, split_spec(args.models[0])[0])) from None


def _write(
    args: argparse.Namespace,
    comp: Comparison,
    source: str,
    preprocessing: dict[str, Any] | None,
    steps: Steps | None,
) -> dict[str, Path]:
    """compare.png, compare.json and maps.npz in ``--out``; their paths."""
    from erf_monitor.cli.compare import write_comparison

    if steps is not None:
        steps.start("writing compare.png, compare.json, maps.npz")
    meta = {
        "specs": list(args.models),
        "weights": "random init" if args.pretrained is None else args.pretrained,
        "input": source,
        "preprocessing": preprocessing,
        "mode": args.mode,
        "seed": args.seed,
    }
    paths = write_comparison(comp, args.out, log_scale=args.log_scale, meta=meta, fmt=args.format)
    if steps is not None:
        steps.done()
    return paths
