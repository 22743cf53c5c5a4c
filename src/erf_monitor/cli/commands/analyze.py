"""``erf-monitor analyze``: the ERF and TRF of a model's layers on noise or images, one folder
per model (``metrics.json``, ``maps.npz``, heatmaps, figures, tables); several models also get
a combined table and a models x layers grid figure. Under ``torchrun`` the probe images are
sharded over the processes and rank 0 writes."""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erf_monitor.cli.args import (
    check_device,
    check_probe_inputs,
    layer_spec,
    parse_position,
    parse_size,
)
from erf_monitor.cli.display import (
    lit,
    print_preprocessing,
    print_warnings,
    results_table,
    rich_console,
    write_positions,
)
from erf_monitor.cli.errors import CLIError, one_line, short_error
from erf_monitor.cli.options import (
    MODE_HELP,
    MODEL_HELP,
    add_command,
    add_figure_options,
    add_model_inputs,
    add_output_options,
    add_position_option,
    add_probe_options,
    add_run_options,
)
from erf_monitor.cli.records import intervals, result_record

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from rich.progress import Progress
    from torch import nn

    from erf_monitor.measure.result import ERFResults

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """The ``analyze`` command and its options."""
    analyze = add_command(
        subparsers,
        "analyze",
        help="ERF and TRF of a model's layers on noise or your images",
        description=(
            "Probe the centre-pixel ERF of chosen layers of a model (random init, or local "
            "pretrained weights) on noise, a .npy array or a folder of images; print a table, "
            "write heatmaps, an overview figure (--format png, pdf or svg), raw maps (maps.npz), "
            "metrics.json and, with --table, RepLKNet-style tables. Several models: one folder "
            "each, a combined table and a models x layers grid figure; --skip-existing resumes "
            "an interrupted batch. Launched with 'torchrun --nproc_per_node N -m erf_monitor.cli "
            "analyze ...', the probe images are sharded over the N processes (gloo on CPU, NCCL "
            "with --device cuda) and rank 0 writes."
        ),
        epilog=MODEL_HELP + "\n" + MODE_HELP,
    )
    analyze.add_argument(
        "model",
        metavar="MODEL",
        nargs="*",
        help="one or more models (see below); several write one folder per model in --out, "
        "a combined table and a models x layers grid figure",
    )
    analyze.add_argument(
        "--names", default=None, help="comma-separated model names (default: the specs)"
    )
    add_probe_options(
        analyze,
        samples=8,
        layers_help="layer names or globs (quote them: 'layer*'), or auto (one per resolution "
        "stage)",
        size_help="N or HxW (default: %(default)s)",
        input_help="noise (standard Gaussian, seeded) or a .npy file (N,C,H,W), (C,H,W) or "
        "(H,W), loaded without pickle",
    )
    add_model_inputs(
        analyze,
        images="preprocessed as the model expects",
        weights="load weights: alone, the model's",
        checkpoints="for --pretrained=PATH checkpoints fine-tuned on N classes",
    )
    add_position_option(
        analyze,
        help="seed unit(s): centre (default), corners, edges, grid:K (a K x K grid), an output "
        "index I,J (negative from the end), a fraction of the output plane 0.0,0.5, or several "
        "separated by ';'. Sets also write fields/<layer>.png (the ERF field)",
    )
    add_run_options(analyze, seed_help="seeds model init and noise")
    add_figure_options(
        analyze,
        log_scale_help="log colour scale for images",
        format_help="figure format: pdf and svg are vector files for papers (the annotated "
        "heatmaps/<layer>.png are written too)",
    )
    _add_statistics_options(analyze)
    add_output_options(
        analyze,
        out="erf_analysis",
        out_help="output directory",
        skip_existing_help="skip models whose folder already holds a finished run with the "
        "same settings (resume an interrupted batch)",
    )
    analyze.set_defaults(func=run)


def _add_statistics_options(analyze: argparse.ArgumentParser) -> None:
    """``--table``, ``--bootstrap`` and ``--level``: the tables and intervals of a run."""
    analyze.add_argument(
        "--table",
        default=None,
        metavar="md|latex",
        help="write the RepLKNet-style table of area ratios a(t) at t = 20/30/50/99%%, ERF "
        "size and coverage as table.md and/or table.tex (md,latex: both)",
    )
    analyze.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help="bootstrap intervals over the probe images (N resamples) in metrics.json and "
        "the table; 0: none",
    )
    analyze.add_argument("--level", type=float, default=0.95, help="bootstrap interval coverage")


# ---------------------------------------------------------------------------------- options
def _check_models(args: argparse.Namespace) -> None:
    """At least one MODEL: ``--pretrained MODEL`` reads MODEL as the weights' path, so a
    MODEL spec found there is given back."""
    if args.model:
        return
    pre = args.pretrained
    if pre not in (None, "cache") and not Path(pre).is_file() and ":" in pre:
        args.model, args.pretrained = [pre], "cache"
    else:
        raise CLIError("MODEL is required (see --help)")


def _check_bootstrap(args: argparse.Namespace) -> None:
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise CLIError(f"--bootstrap must be 0 (no intervals) or >= 2, got {args.bootstrap}")
    if args.bootstrap and args.samples < 2:
        raise CLIError(f"--bootstrap needs --samples >= 2 (resampled images), got {args.samples}")
    if not 0.0 < args.level < 1.0:
        raise CLIError(f"--level must be in (0, 1), got {args.level}")


def _table_formats(text: str | None) -> list[str]:
    if not text:
        return []
    formats = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in formats if t not in ("md", "latex")]
    if bad or not formats:
        raise CLIError(f"--table must be md, latex or md,latex, got {text!r}")
    return list(dict.fromkeys(formats))


def _label(spec: str) -> str:
    """``path/to/nets.py:build`` -> ``nets.py:build``; other specs as they are."""
    file, sep, factory = spec.rpartition(":")
    return f"{Path(file).name}:{factory}" if sep and file.endswith(".py") else spec


def _model_names(args: argparse.Namespace, specs: list[str]) -> list[str]:
    """One name per MODEL: ``--names``, else the specs (shortened in a batch)."""
    if args.names:
        names = [n.strip() for n in args.names.split(",")]
    else:  # a file spec is named by its file and factory, not its whole path
        names = [_label(s) for s in specs] if len(specs) > 1 else specs
    if len(names) != len(specs):
        raise CLIError(f"--names has {len(names)} names for {len(specs)} models")
    if len(specs) > 1 and args.pretrained not in (None, "cache"):
        raise CLIError(
            "--pretrained=PATH loads one checkpoint; with several models use --pretrained "
            "alone (each model's cached weights) or analyze them one at a time"
        )
    return names


def _analyze_request(
    args: argparse.Namespace, spec: str, layers: str | list[str]
) -> dict[str, Any]:
    """The settings that decide a model's numbers (``--skip-existing`` compares them)."""
    return {
        "model": spec,
        "weights": args.pretrained,
        "input": args.input,
        "images": args.images,
        "preprocessing": [args.size, args.mean, args.std],
        "input_size": args.input_size,
        "channels": args.channels,
        "samples": args.samples,
        "layers": layers,
        "mode": args.mode,
        "position": args.position,
        "seed": args.seed,
        "bootstrap": [args.bootstrap, args.level] if args.bootstrap else None,
    }


@dataclass(frozen=True)
class _Settings:
    """What every model of a run is probed with (the options, read and checked)."""

    layers: str | list[str]
    size: tuple[int, ...]
    position: Any
    device: str
    tables: list[str]


# ---------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    """Analyze every MODEL; with several, also write the batch's combined outputs."""
    _check_models(args)
    size = parse_size(args.input_size)
    check_device(args.device)
    layers = layer_spec(args.layers)
    check_probe_inputs(args)
    _check_bootstrap(args)
    tables = _table_formats(args.table)
    specs = list(args.model)
    names = _model_names(args, specs)

    from erf_monitor.cli.batch import folder_names, setup_distributed, teardown_distributed
    from erf_monitor.probe.distributed import rank_and_world

    folders = folder_names(names)  # (a BatchError is a CLIError)
    position = parse_position(args.position, len(size))
    out = Path(args.out)
    started, device = setup_distributed(args.device)
    try:
        settings = _Settings(layers, size, position, device, tables)
        rank, _ = rank_and_world()
        console = rich_console(quiet=rank != 0)
        records: dict[str, tuple[Path, dict[str, Any]]] = {}
        for name, spec in zip(names, specs):
            folder = out / folders[name] if len(specs) > 1 else out
            wanted = _analyze_request(args, spec, layers)
            found = _finished(folder, wanted) if args.skip_existing else None
            if found is not None:
                console.print(
                    f"{lit(name)}: finished in [bold]{lit(folder)}[/] with the same "
                    "settings; skipped (--skip-existing).",
                    highlight=False,
                )
            else:
                found = _analyze_model(args, settings, spec, name, folder, wanted)
            records[name] = (folder, found)
        if len(specs) > 1 and rank == 0:
            _write_batch(records, out, args, tables, console)
    finally:
        teardown_distributed(started)
    return 0


def _finished(folder: Path, wanted: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record of a finished run in ``folder`` with the settings ``wanted`` (else ``None``);
    rank 0 decides, every rank follows."""
    from erf_monitor.cli.batch import BatchError, finished
    from erf_monitor.probe.distributed import broadcast_object, rank_and_world

    found, error = None, None
    if rank_and_world()[0] == 0:
        try:
            found = finished(folder, wanted)
        except BatchError as exc:
            error = str(exc)
    found, error = broadcast_object((found, error))
    if error is not None:
        raise CLIError(error)
    return found


# ---------------------------------------------------------------------------------- one model
def _progress(err: Console, disable: bool) -> AbstractContextManager[Progress]:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=disable,
    )


def _analyze_model(
    args: argparse.Namespace,
    settings: _Settings,
    spec: str,
    name: str,
    out: Path,
    wanted: dict[str, Any],
) -> dict[str, Any]:
    """Probe one model and write its folder (on rank 0); returns its ``metrics.json`` record."""
    from erf_monitor.core.modes import DEFINITIONS
    from erf_monitor.probe.distributed import rank_and_world

    rank, world = rank_and_world()
    err = rich_console(stderr=True, quiet=rank != 0)
    # no spinner frames in logs
    with _progress(err, disable=args.quiet or not err.is_terminal or rank != 0) as progress:
        model, x, source, preprocessing = _build(args, settings, spec, progress)
        results, seconds = _probe(args, settings, spec, model, x, source, progress, err)
        record: dict[str, Any] = {
            "name": name,
            "model": spec,
            "weights": "random init" if args.pretrained is None else args.pretrained,
            "input": source,
            "preprocessing": preprocessing,
            "input_shape": list(x.shape),
            "mode": args.mode,
            "definition": DEFINITIONS[args.mode],
            "seed": args.seed,
            "world_size": world,
            "probe_seconds": seconds,
            "request": wanted,
            "layers": {layer: result_record(r) for layer, r in results.items()},
        }
        if rank != 0:  # rank 0 alone bootstraps and writes
            return record
        if args.bootstrap:
            _bootstrap(args, results, record, progress)
        overview = _write_figures(args, results, out, f"{name} ({source})", progress)
    _write_outputs(args, settings, results, record, out, overview)
    return record


def _build(
    args: argparse.Namespace, settings: _Settings, spec: str, progress: Progress
) -> tuple[nn.Module, torch.Tensor, str, dict[str, Any] | None]:
    """The model (seeded, on the device), the probe images, their description and their
    preprocessing."""
    import torch

    from erf_monitor.cli.models import load_model
    from erf_monitor.cli.probe_inputs import load_probe_inputs

    task = progress.add_task(f"building {spec}", total=None)
    # Seeded initialisation without touching the caller's global RNG (main() may be
    # called in-process, e.g. from tests); the same weights on every rank.
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        model = load_model(spec, pretrained=args.pretrained, num_classes=args.num_classes)
    model = model.to(settings.device)
    x, source, preprocessing = load_probe_inputs(args, model, spec, settings.size)
    progress.update(task, completed=1, total=1)
    return model, x, source, preprocessing


def _probe(
    args: argparse.Namespace,
    settings: _Settings,
    spec: str,
    model: nn.Module,
    x: torch.Tensor,
    source: str,
    progress: Progress,
    err: Console,
) -> tuple[ERFResults, float]:
    """The results of every layer and the probe's seconds; without the TRF (n/a columns, a
    warning) when its analysis cannot follow the model."""
    import warnings

    from erf_monitor.core.errors import ERFProbeError, ERFProbeWarning
    from erf_monitor.probe.distributed import rank_and_world
    from erf_monitor.probe.sharded import compute_erf_sharded

    layers, world = settings.layers, rank_and_world()[1]
    what = "auto-picked layers" if layers == "auto" else f"{len(layers)} layer spec(s)"
    shards = f" on {world} processes" if world > 1 else ""
    task = progress.add_task(
        f"probing {what} on {x.shape[0]} x {'x'.join(str(s) for s in x.shape[1:])} "
        f"{source}{shards}",
        total=None,
    )
    t0 = time.perf_counter()
    kw: dict[str, Any] = {
        "mode": args.mode, "chunk_size": args.chunk_size, "position": settings.position,
        "keep_per_sample": args.bootstrap > 0,
    }  # fmt: skip
    x = x.to(settings.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ERFProbeWarning)
        try:
            try:
                results = compute_erf_sharded(model, x, layers, **kw)
            except (ValueError, TypeError, ERFProbeError):
                raise
            except Exception as exc:  # the TRF analysis could not follow this model
                err.print(
                    f"[yellow]warning[/]: the theoretical receptive field could not be "
                    f"analysed ({type(exc).__name__}: {lit(one_line(exc))}); TRF columns and "
                    "ratios are n/a.",
                    highlight=False,
                )
                results = compute_erf_sharded(model, x, layers, trf="skip", **kw)
        except (ValueError, TypeError, ERFProbeError) as exc:
            raise CLIError(short_error(exc, spec)) from None
    print_warnings(caught, err)
    seconds = time.perf_counter() - t0
    progress.update(task, completed=1, total=1)
    return results, seconds


def _bootstrap(
    args: argparse.Namespace, results: ERFResults, record: dict[str, Any], progress: Progress
) -> None:
    """Every layer's bootstrap intervals, into ``record``."""
    task = progress.add_task(f"bootstrap: {args.bootstrap} resamples per layer", total=len(results))
    record["bootstrap"] = {"n_boot": args.bootstrap, "level": args.level, "method": "bca"}
    for layer, r in results.items():
        record["layers"][layer]["intervals"] = intervals(
            r, n_boot=args.bootstrap, level=args.level, seed=args.seed
        )
        progress.advance(task)


def _write_figures(
    args: argparse.Namespace, results: ERFResults, out: Path, title: str, progress: Progress
) -> Path:
    """Each layer's heatmap (and figure, in ``--format``) and the overview figure's path."""
    from erf_monitor.sinks import safe_filename
    from erf_monitor.viz.export import save_figure
    from erf_monitor.viz.render import erf_figure, render_heatmap, save_png

    task = progress.add_task("writing heatmaps", total=len(results) + 1)
    out.mkdir(parents=True, exist_ok=True)
    for layer, r in results.items():
        path = out / "heatmaps" / f"{safe_filename(layer)}.png"
        save_png(render_heatmap(r, log_scale=args.log_scale), path)
        if args.format != "png" and 1 <= r.heatmap.dim() <= 3:
            save_figure(r.plot(log_scale=args.log_scale), path.with_suffix(f".{args.format}"))
        progress.advance(task)
    fig = erf_figure(results, log_scale=args.log_scale, title=title)
    overview = save_figure(fig, out / f"erf_overview.{args.format}")
    progress.advance(task)
    return overview


def _write_outputs(
    args: argparse.Namespace,
    settings: _Settings,
    results: ERFResults,
    record: dict[str, Any],
    out: Path,
    overview: Path,
) -> None:
    """The raw maps, tables and ``metrics.json`` (last: a folder with it is finished), and
    the printed tables and summary."""
    from erf_monitor.cli.batch import write_json
    from erf_monitor.core.modes import metadata
    from erf_monitor.sinks import save_npz

    console = rich_console()
    name, source, world = record["name"], record["input"], record["world_size"]
    maps = {path: r.heatmap.numpy() for path, r in results.flat().items()}
    save_npz(out / "maps.npz", {**maps, **metadata(args.mode)})
    written = []
    if settings.tables:
        from erf_monitor.cli.tables import caption, rows_of, write_tables

        written = write_tables(rows_of(name, record), out, settings.tables, caption(record))
    if record["preprocessing"] is not None:
        print_preprocessing(console, record["preprocessing"])
    title = f"ERF of {lit(name)} — {lit(source)}, mode {args.mode}"
    console.print(results_table(results, title=title))
    write_positions(results, out, console, f"ERF at position {args.position!r}", args.format)
    write_json(out / "metrics.json", record)  # last: a folder with metrics.json is finished
    shards = f" on {world} processes" if world > 1 else ""
    console.print(
        f"Probe: {record['probe_seconds']:.2f} s{shards}. Wrote "
        f"[bold]{lit(out / 'metrics.json')}[/], "
        f"[bold]{lit(out / 'maps.npz')}[/] (np.load(..., allow_pickle=False)), "
        f"[bold]{lit(overview)}[/]"
        + "".join(f", [bold]{lit(p)}[/]" for p in written)
        + f" and {len(results)} heatmaps in [bold]{lit(out / 'heatmaps')}[/].",
        highlight=False,
    )


# ---------------------------------------------------------------------------------- batch
def _write_batch(
    records: Mapping[str, tuple[Path, dict[str, Any]]],
    out: Path,
    args: argparse.Namespace,
    tables: list[str],
    console: Console,
) -> None:
    """A batch's combined outputs: the models x layers grid figure and the combined table."""
    from erf_monitor.cli.batch import panels
    from erf_monitor.cli.tables import caption, rich_table, rows_of, write_tables
    from erf_monitor.viz.export import save_figure
    from erf_monitor.viz.grid import grid_figure

    rows = [row for name, (_, rec) in records.items() for row in rows_of(name, rec)]
    first = next(iter(records.values()))[1]
    text = caption(first, models=len(records))
    console.print(rich_table(rows, title=f"{len(records)} models — mode {args.mode}"))
    written = write_tables(rows, out, tables, text) if tables else []
    grid = {name: panels(folder, rec) for name, (folder, rec) in records.items()}
    grid = {name: p for name, p in grid.items() if p}
    if grid:
        n = (first.get("input_shape") or [0])[0]
        source = f"{n} noise images" if first["input"] == "noise" else first["input"]
        title = f"ERF maps (mode {args.mode}, {source})"
        fig = grid_figure(grid, log_scale=args.log_scale, title=title)
        written.insert(0, save_figure(fig, out / f"grid.{args.format}"))
    console.print(
        f"Batch of {len(records)} models: one folder per model in [bold]{lit(out)}[/]"
        + "".join(f", [bold]{lit(p)}[/]" for p in written)
        + ".",
        highlight=False,
    )
