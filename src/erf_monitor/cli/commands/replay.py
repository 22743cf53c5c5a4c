"""``erf-monitor replay``: the ERF growth of a finished run, probed from its checkpoints
(:func:`erf_monitor.cli.replay.replay` on a MODEL spec). Under ``torchrun`` the checkpoints
are shared over the processes and rank 0 writes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erf_monitor.cli.args import check_probe_inputs, layer_spec, parse_position
from erf_monitor.cli.display import rich_console
from erf_monitor.cli.errors import CLIError, one_line
from erf_monitor.cli.options import (
    MODE_HELP,
    MODEL_HELP,
    add_command,
    add_model_inputs,
    add_output_options,
    add_position_option,
    add_probe_options,
    add_run_options,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from erf_monitor.cli.replay import Checkpoint, Replay

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """The ``replay`` command and its options."""
    replay = add_command(
        subparsers,
        "replay",
        help="the ERF growth of a finished run, from its checkpoints",
        description=(
            "Load every checkpoint CKPT (files, or folders searched for Lightning .ckpt files, "
            "Hugging Face checkpoint-N/ folders and .pt/.pth/.safetensors state dicts; read as "
            "weights only) into MODEL, probe it on the same images at its training step (its "
            "global_step, else the last number in its name) and log what a live ERF monitor "
            "would have logged: metrics.csv, heatmaps, raw maps and alerts in --out (and "
            "--logger), then the summary table. 'erf-monitor report OUT' shows the growth "
            "curves; --skip-existing resumes an interrupted replay. Launched with 'torchrun "
            "--nproc_per_node N -m erf_monitor.cli replay ...', the checkpoints are shared "
            "over the N processes and rank 0 writes."
        ),
        epilog=MODEL_HELP + "\n" + MODE_HELP,
    )
    replay.add_argument("model", metavar="MODEL", help="the architecture (see below)")
    replay.add_argument("checkpoints", metavar="CKPT", nargs="+", help="checkpoint files/folders")
    add_probe_options(replay, samples=8)
    add_model_inputs(  # each CKPT holds the weights: --pretrained refused, not advertised
        replay,
        images="preprocessed as MODEL expects; the same images for every checkpoint",
        weights=None,
        checkpoints="for checkpoints trained on N classes",
    )
    add_position_option(replay, help="seed unit(s)")
    replay.add_argument(
        "--min-coverage", default="0.05", help="coverage alert threshold of the deepest layer, "
        "or none",
    )  # fmt: skip
    replay.add_argument("--patience", type=int, default=1, help="probes below before alerting")
    replay.add_argument(
        "--logger",
        choices=("csv", "tensorboard", "wandb", "mlflow"),
        default="csv",
        help="also log to TensorBoard (OUT/erf), W&B (offline unless configured) or MLflow "
        "(MLFLOW_TRACKING_URI, default sqlite:///OUT/mlflow.db); csv: the run folder only",
    )
    add_run_options(replay, seed_help="seeds model init and noise")
    add_output_options(
        replay,
        out="erf_replay",
        out_help="run folder",
        skip_existing_help="resume: skip steps probed already in --out",
    )
    replay.set_defaults(func=run)


def _min_coverage(text: str) -> float | None:
    cov = text.strip().lower()
    try:
        return None if cov in ("none", "off", "0") else float(cov)
    except ValueError:
        raise CLIError(f"--min-coverage must be a fraction or none, got {cov!r}") from None


def run(args: argparse.Namespace) -> int:
    """Replay every checkpoint into ``--out`` and say where the run is."""
    import torch

    from erf_monitor.cli.batch import setup_distributed, teardown_distributed
    from erf_monitor.cli.models import load_model
    from erf_monitor.cli.probe_inputs import load_probe_inputs
    from erf_monitor.cli.replay import find_checkpoints
    from erf_monitor.probe.distributed import rank_and_world

    if args.pretrained is not None:
        raise CLIError("replay loads the weights of each CKPT; --pretrained is not used")
    check_probe_inputs(args)
    min_coverage = _min_coverage(args.min_coverage)
    position = parse_position(args.position)
    checkpoints = find_checkpoints(args.checkpoints)
    with torch.random.fork_rng():  # seeded, without touching the caller's RNG
        torch.manual_seed(args.seed)
        model = load_model(args.model, num_classes=args.num_classes)
    x, source, _ = load_probe_inputs(args, model, args.model)
    out = Path(args.out)
    started, device = setup_distributed(args.device)  # torchrun: checkpoints shared
    try:
        rank, world = rank_and_world()
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        if not args.quiet:
            shards = f" on {world} processes" if world > 1 else ""
            rich_console(stderr=True, quiet=rank != 0).print(
                f"Replaying {len(checkpoints)} checkpoint(s) of {args.model} (steps "
                f"{', '.join(str(c.step) for c in checkpoints)}) on {x.shape[0]} {source} "
                f"image(s){shards}.",
                highlight=False,
                markup=False,
            )
        done = _replay(args, model, x, device, checkpoints, out, position, min_coverage)
    finally:
        teardown_distributed(started)
    if rank != 0:
        return 0
    skipped = len(checkpoints) - len(done.probed)
    rich_console().print(
        f"Probed {len(done.probed)} checkpoint(s)"
        + (f" ({skipped} done before, skipped)" if skipped else "")
        + f"; the run is in [bold]{out}[/] (erf-monitor report {out}).",
        highlight=False,
    )
    return 0


def _replay(
    args: argparse.Namespace,
    model: nn.Module,
    x: torch.Tensor,
    device: str,
    checkpoints: list[Checkpoint],
    out: Path,
    position: Any,
    min_coverage: float | None,
) -> Replay:
    """The replay itself on ``device``, logging to ``--logger`` and showing its steps (rank
    0)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from erf_monitor.cli.compare import LineSteps, RichSteps, Steps
    from erf_monitor.cli.replay import ReplayError, logger_sinks, replay
    from erf_monitor.core.errors import ERFProbeError
    from erf_monitor.probe.distributed import rank_and_world

    rank = rank_and_world()[0]
    err = rich_console(stderr=True, quiet=rank != 0)
    live = err.is_terminal and not args.quiet and rank == 0
    try:
        sinks, finish = logger_sinks(args.logger, out) if rank == 0 else ([], lambda: None)
    except (ReplayError, ModuleNotFoundError) as exc:
        raise CLIError(one_line(exc)) from None
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
        console=err, transient=True, disable=not live,
    ) as display:  # fmt: skip
        steps: Steps | None = RichSteps(display) if live else None
        if not live and not args.quiet and rank == 0:
            steps = LineSteps(err)
        try:
            return replay(
                model.to(device), [c.path for c in checkpoints], layer_spec(args.layers),
                inputs=x.to(device), out=out, logger=sinks or None,
                skip_existing=args.skip_existing, progress=steps, mode=args.mode,
                position=position, min_coverage=min_coverage, patience=args.patience,
                chunk_size=args.chunk_size, seed=args.seed,
            )  # fmt: skip
        except (ValueError, TypeError, ERFProbeError) as exc:  # (a ReplayError included)
            raise CLIError(one_line(exc)) from None
        finally:
            finish()
