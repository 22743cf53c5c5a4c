"""The ``erf-monitor`` command line: ``demo``, ``analyze``, ``layers``, ``report``, ``compare``,
``replay``.

``main(argv)`` returns the exit code: 0 on success, 2 for a usage error (bad MODEL spec,
unknown layer, unreadable input file...), reported as one line on stderr without a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erf_monitor.cli.errors import CLIError
from erf_monitor.core.modes import DEFINITIONS, MODES

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from rich.table import Table

    from erf_monitor.measure.result import ERFResult

__all__ = ["main", "positions_table", "results_table"]

_MODEL_HELP = """\
MODEL is one of:
  torchvision:NAME         a torchvision model, randomly initialised (e.g. torchvision:resnet50)
  timm:NAME                a timm model, randomly initialised (needs timm installed)
  path/to/file.py:FACTORY  imports file.py and calls FACTORY() -> nn.Module.
                           WARNING: this form RUNS THE CODE IN THAT FILE; use only files you
                           trust. It is the only form that executes user code.
No weights are downloaded: models are randomly initialised (seeded with --seed) unless
--pretrained loads weights from a local file: the torch.hub / Hugging Face cache that
torchvision and timm fill when they download weights elsewhere (--pretrained alone), or a
checkpoint file (--pretrained=PATH; read with torch.load(weights_only=True) or safetensors).

Images (--images DIR) are preprocessed the way the model expects: the torchvision weights'
transforms, timm's data config, or --size/--mean/--std (which override those).
"""

#: The exact definition of each ``--mode`` (the text saved with every result).
_MODE_HELP = "MODE (--mode) is one of:\n" + "".join(
    textwrap.fill(
        DEFINITIONS[name], 88, initial_indent=f"  {name:<10} ", subsequent_indent=" " * 13
    )
    + "\n"
    for name in MODES
)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every option's help (unless it says its own, or there is none:
    ``None``, an off flag); the descriptions' and epilogs' line breaks kept."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _wrap(text: str) -> str:
    return textwrap.fill(text, 88)


def _close_option(word: str, parser: argparse.ArgumentParser) -> str | None:
    """The option of ``parser`` closest to a mistyped ``word`` (``--input_size`` ->
    ``--input-size``), or ``None``."""
    import difflib

    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    flag = word.split("=", 1)[0]
    close = difflib.get_close_matches(flag.replace("_", "-").lower(), options, n=1, cutoff=0.6)
    return close[0] if close else None


class _Parser(argparse.ArgumentParser):
    """Usage errors end with a close match where there is one: ``invalid choice: 'analyse'``
    -> "did you mean 'analyze'?"."""

    def error(self, message: str) -> Any:  # argparse's own signature returns NoReturn
        import difflib
        import re

        found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if found:
            choices = re.findall(r"'([^']*)'", found.group(2))
            close = difflib.get_close_matches(found.group(1), choices, n=1, cutoff=0.6)
            if close:
                message += f"; did you mean {close[0]!r}?"
        super().error(message)


def _unknown_options(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """One line for options ``parser`` does not know, with the closest known one."""
    bad = [w for w in extras if w.startswith("-")] or list(extras)
    text = f"unrecognized argument{'s' if len(bad) > 1 else ''}: {' '.join(bad)}"
    close = _close_option(bad[0], parser) if bad[0].startswith("--") else None
    return text + (f" (did you mean {close}?)" if close else "")


def _check_device(text: str) -> str:
    """``--device`` checked before anything is loaded: a device torch knows, and that this
    machine has; the error says which ones it has."""
    import torch

    available = ["cpu"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        available += ["cuda"] + [f"cuda:{i}" for i in range(n)]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        available.append("mps")
    have = ", ".join(available)
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {text!r} is not a torch device; available here: {have}") from None
    if dev.type == "cpu" or text in available:
        return text
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) was built without CUDA"
            if torch.version.cuda is None
            else "torch finds no NVIDIA GPU or driver here"
        )
        raise CLIError(f"--device {text}: {why}; use --device cpu (available here: {have})")
    raise CLIError(f"--device {text} is not available on this machine; available here: {have}")


# ---------------------------------------------------------------------------------- helpers
def _console(stderr: bool = False, quiet: bool = False) -> Console:
    from rich.console import Console

    console = Console(stderr=stderr, quiet=quiet)
    if not console.is_terminal:  # pipes and captured output: do not squeeze tables to 80 cols
        console = Console(stderr=stderr, quiet=quiet, width=max(console.width, 120))
    return console


def _lit(value: object) -> str:
    """``value`` as text that rich prints as given: names and paths are never markup
    (``net[/]`` would end a style, ``exp[lr=0.1]`` would vanish)."""
    from rich.markup import escape

    return escape(str(value))


def _fmt(value: float, spec: str = ".3f") -> str:
    return "n/a" if not math.isfinite(value) else format(value, spec)


def _trf_text(r: ERFResult) -> tuple[str, str]:
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
        size, clipped = _trf_text(r)
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
            _fmt(r.ratio, ".2f"),
            cov_text,
            ", ".join(_fmt(s, ".1f") for s in r.sigma),
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


def _print_warnings(caught: Sequence[Any], err: Console) -> None:
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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _short_error(exc: BaseException, spec: str) -> str:
    """One short line; an unknown layer's close matches, and the full list behind a hint."""
    from erf_monitor.targets.layers import UnknownLayerError

    if isinstance(exc, UnknownLayerError):
        close = f" (did you mean {', '.join(map(repr, exc.close[:3]))}?)" if exc.close else ""
        every = ", ".join(exc.names)
        if len(every) <= 60:  # a small model: its layers fit on the line
            return f"unknown layer {exc.layer!r}{close}; its layers: {every}"
        return f"unknown layer {exc.layer!r}{close}; list the layers: erf-monitor layers {spec}"
    return _one_line(exc)


def _json_float(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _result_record(r: ERFResult) -> dict[str, Any]:
    trf = r.trf
    rec: dict[str, Any] = {"output_shape": list(r.output_shape), "num_samples": r.num_samples}
    if trf is None:
        rec["trf"] = None
    else:
        rec["trf"] = {
            "size": [_json_float(s) for s in trf.size],
            "stride": [_json_float(s) for s in trf.stride],
            "clipped": [[int(s), int(e)] for s, e in trf.clipped],
            "clipped_size": list(trf.clipped_size),
            "global": [bool(g) for g in trf.global_dims],
            "data_dependent": trf.data_dependent,
            "reason": trf.reason,
            "method": trf.method,
        }
        if trf.data_dependent:  # no finite field: no interval to report
            del rec["trf"]["clipped"], rec["trf"]["clipped_size"]
    rec["centre_pixel"] = list(r.centre_pixel)
    rec["theoretical_centre"] = [float(c) for c in r.theoretical_centre]
    if r.trf_issue is not None:
        rec["trf_issue"] = r.trf_issue
    rec["metrics"] = {k: _json_float(v) for k, v in r.scalars().items()}
    rec["position"] = r.position
    rec["output_index"] = list(r.output_index)
    if r.trf is not None and not r.trf.data_dependent:
        rec["trf"]["interval"] = [[_json_float(a), _json_float(b)] for a, b in r.trf.interval]
    if r.field is not None:
        rec["positions"] = {key: _result_record(x) for key, x in r.field.items() if key != "centre"}
    return rec


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
                _fmt(x.visible_size, ".1f"),
                f"{x.coverage:.1%}",
                "n/a" if math.isnan(x.coverage_trf) else f"{x.coverage_trf:.1%}",
                ",".join(_fmt(o, "+.1f") for o in x.centroid_offset),
                _fmt(x.anisotropy, ".2f"),
                "n/a" if math.isnan(x.dead_fraction) else f"{x.dead_fraction:.0%}",
            )
        if r.field is not None:
            ratio = r.field.border_ratio
            table.add_row(escape(name), "[i]border_ratio[/]", "", "", "", _fmt(ratio, ".2f"))
    return table


def _write_positions(
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
            console.print(
                f"ERF field of {_lit(repr(name))}: [bold]{_lit(path)}[/]", highlight=False
            )


# ---------------------------------------------------------------------------------- analyze
def _parse_size(text: str, flag: str = "--input-size") -> tuple[int, ...]:
    parts = [p for p in text.replace(",", "x").lower().split("x") if p]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise CLIError(f"{flag} must be N or HxW (e.g. 224 or 224x160), got {text!r}") from None
    if not sizes or len(sizes) > 3 or any(s < 1 for s in sizes):
        raise CLIError(f"{flag} must be N or HxW with positive sizes, got {text!r}")
    return sizes * 2 if len(sizes) == 1 else sizes


def _layer_spec(values: Sequence[str]) -> str | list[str]:
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if not names or names == ["auto"]:
        return "auto"
    return names


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise CLIError(
            f"{flag} must be comma-separated numbers (e.g. 0.5,0.5,0.5), got {text!r}"
        ) from None
    if len(values) not in (1, 3):
        raise CLIError(f"{flag} needs 1 or 3 values (images are read as RGB), got {text!r}")
    return values


def _load_images(
    args: argparse.Namespace, model: Any, spec: str
) -> tuple[torch.Tensor, str, dict[str, Any]]:
    from erf_monitor.cli.models import spec_preprocessing
    from erf_monitor.inputs.images import list_images, load_images, preprocessing_for

    size = _parse_size(args.size, "--size") if args.size else None
    if size is not None and len(size) != 2:
        raise CLIError(f"--size must be N or HxW for images, got {args.size!r}")
    mean, std = _floats(args.mean, "--mean"), _floats(args.std, "--std")
    if size is None and mean is None and std is None:
        prep = spec_preprocessing(spec, model)
    else:
        prep = preprocessing_for(model, size=size, mean=mean, std=std)
    try:
        paths = list_images(args.images)[: args.samples]
        x = load_images(paths, transform=prep)
    except (ValueError, TypeError) as exc:
        raise CLIError(_one_line(exc)) from None
    return x, f"{len(paths)} images from {args.images}", prep.describe()


def _load_inputs(args: argparse.Namespace, size: tuple[int, ...]) -> tuple[torch.Tensor, str]:
    import numpy as np
    import torch

    if args.input == "noise":
        gen = torch.Generator().manual_seed(args.seed)
        shape = (args.samples, args.channels, *size)
        return torch.randn(shape, generator=gen), "noise"
    path = Path(args.input)
    if path.suffix != ".npy":
        raise CLIError(f"--input must be 'noise' or a .npy file, got {args.input!r}")
    if not path.is_file():
        raise CLIError(f"--input file {str(path)!r} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # pickled object arrays, corrupt files
        raise CLIError(f"cannot read {str(path)!r} as a plain .npy array: {exc}") from None
    if not np.issubdtype(arr.dtype, np.number):
        raise CLIError(f"{str(path)!r} holds {arr.dtype} data, not numbers")
    if arr.ndim == 2:  # (H, W)
        arr = arr[None, None]
    elif arr.ndim == 3:  # (C, H, W)
        arr = arr[None]
    if arr.ndim not in (3, 4, 5):
        raise CLIError(
            f"{str(path)!r} has shape {arr.shape}; expected (N, C, H, W), (C, H, W) or (H, W)"
        )
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[: args.samples]
    return x, str(path)


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


def _label(spec: str) -> str:
    """``path/to/nets.py:build`` -> ``nets.py:build``; other specs as they are."""
    file, sep, factory = spec.rpartition(":")
    return f"{Path(file).name}:{factory}" if sep and file.endswith(".py") else spec


def _table_formats(text: str | None) -> list[str]:
    if not text:
        return []
    formats = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in formats if t not in ("md", "latex")]
    if bad or not formats:
        raise CLIError(f"--table must be md, latex or md,latex, got {text!r}")
    return list(dict.fromkeys(formats))


def _check_probe_inputs(args: argparse.Namespace) -> None:
    """The checks of the options of :func:`_add_probe_options` and ``--images``."""
    if args.samples < 1:
        raise CLIError(f"--samples must be >= 1, got {args.samples}")
    if args.images is not None and args.input != "noise":
        raise CLIError("give either --images DIR or --input FILE, not both")
    if args.images is None and (args.size or args.mean or args.std):
        raise CLIError("--size/--mean/--std preprocess --images; for noise use --input-size")


def _cmd_analyze(args: argparse.Namespace) -> int:
    size = _parse_size(args.input_size)
    _check_device(args.device)
    layers = _layer_spec(args.layers)
    _check_probe_inputs(args)
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise CLIError(f"--bootstrap must be 0 (no intervals) or >= 2, got {args.bootstrap}")
    if args.bootstrap and args.samples < 2:
        raise CLIError(f"--bootstrap needs --samples >= 2 (resampled images), got {args.samples}")
    if not 0.0 < args.level < 1.0:
        raise CLIError(f"--level must be in (0, 1), got {args.level}")
    tables = _table_formats(args.table)
    specs = list(args.model)
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

    from erf_monitor.cli.batch import (
        BatchError,
        finished,
        folder_names,
        setup_distributed,
        teardown_distributed,
    )
    from erf_monitor.probe.distributed import broadcast_object, rank_and_world
    from erf_monitor.targets.positions import parse_position_text, request

    folders = folder_names(names)  # (a BatchError is a CLIError)
    try:
        position = parse_position_text(args.position)
        request(position, len(size))
    except (ValueError, TypeError) as exc:
        raise CLIError(f"--position: {_one_line(exc)}") from None
    out = Path(args.out)
    started, device = setup_distributed(args.device)
    try:
        rank, _ = rank_and_world()
        console = _console(quiet=rank != 0)
        records: dict[str, tuple[Path, dict[str, Any]]] = {}
        for name, spec in zip(names, specs):
            folder = out / folders[name] if len(specs) > 1 else out
            wanted = _analyze_request(args, spec, layers)
            if args.skip_existing:
                found, error = None, None
                if rank == 0:  # rank 0 decides; every rank follows
                    try:
                        found = finished(folder, wanted)
                    except BatchError as exc:
                        error = str(exc)
                found, error = broadcast_object((found, error))
                if error is not None:
                    raise CLIError(error)
                if found is not None:
                    console.print(
                        f"{_lit(name)}: finished in [bold]{_lit(folder)}[/] with the same "
                        "settings; skipped (--skip-existing).",
                        highlight=False,
                    )
                    records[name] = (folder, found)
                    continue
            record = _analyze_model(
                args, spec, name, folder, layers, size, position, device, wanted, tables
            )
            records[name] = (folder, record)
        if len(specs) > 1 and rank == 0:
            _write_batch(records, out, args, tables, console)
    finally:
        teardown_distributed(started)
    return 0


def _analyze_model(
    args: argparse.Namespace,
    spec: str,
    name: str,
    out: Path,
    layers: str | list[str],
    size: tuple[int, ...],
    position: Any,
    device: str,
    wanted: dict[str, Any],
    tables: list[str],
) -> dict[str, Any]:
    """Probe one model and write its folder (on rank 0); returns its ``metrics.json`` record."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from erf_monitor.probe.distributed import rank_and_world

    rank, world = rank_and_world()
    err = _console(stderr=True, quiet=rank != 0)
    console = _console(quiet=rank != 0)

    import torch

    from erf_monitor.cli.models import load_model

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=args.quiet or not err.is_terminal or rank != 0,  # no spinner frames in logs
    ) as progress:
        task = progress.add_task(f"building {spec}", total=None)
        # Seeded initialisation without touching the caller's global RNG (main() may be
        # called in-process, e.g. from tests); the same weights on every rank.
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            model = load_model(spec, pretrained=args.pretrained, num_classes=args.num_classes)
        model = model.to(device)
        preprocessing: dict[str, Any] | None = None
        if args.images is not None:
            x, source, preprocessing = _load_images(args, model, spec)
        else:
            x, source = _load_inputs(args, size)
        progress.update(task, completed=1, total=1)

        from erf_monitor.probe.sharded import compute_erf_sharded

        what = "auto-picked layers" if layers == "auto" else f"{len(layers)} layer spec(s)"
        shards = f" on {world} processes" if world > 1 else ""
        task = progress.add_task(
            f"probing {what} on {x.shape[0]} x {'x'.join(str(s) for s in x.shape[1:])} "
            f"{source}{shards}",
            total=None,
        )
        t0 = time.perf_counter()
        from erf_monitor.core.errors import ERFProbeError

        kw: dict[str, Any] = {
            "mode": args.mode, "chunk_size": args.chunk_size, "position": position,
            "keep_per_sample": args.bootstrap > 0,
        }  # fmt: skip
        import warnings

        from erf_monitor.core.errors import ERFProbeWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ERFProbeWarning)
            try:
                try:
                    results = compute_erf_sharded(model, x.to(device), layers, **kw)
                except (ValueError, TypeError, ERFProbeError):
                    raise
                except Exception as exc:  # the TRF analysis could not follow this model
                    err.print(
                        f"[yellow]warning[/]: the theoretical receptive field could not be "
                        f"analysed ({type(exc).__name__}: {_lit(_one_line(exc))}); TRF columns and "
                        "ratios are n/a.",
                        highlight=False,
                    )
                    results = compute_erf_sharded(model, x.to(device), layers, trf="skip", **kw)
            except (ValueError, TypeError, ERFProbeError) as exc:
                raise CLIError(_short_error(exc, spec)) from None
        _print_warnings(caught, err)
        seconds = time.perf_counter() - t0
        progress.update(task, completed=1, total=1)

        from erf_monitor.core.modes import DEFINITIONS, metadata

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
            "layers": {layer: _result_record(r) for layer, r in results.items()},
        }
        if rank != 0:  # rank 0 alone bootstraps and writes
            return record
        if args.bootstrap:
            task = progress.add_task(
                f"bootstrap: {args.bootstrap} resamples per layer", total=len(results)
            )
            record["bootstrap"] = {"n_boot": args.bootstrap, "level": args.level, "method": "bca"}
            for layer, r in results.items():
                record["layers"][layer]["intervals"] = _intervals(r, args)
                progress.advance(task)

        from erf_monitor.sinks import safe_filename, save_npz
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
        fig = erf_figure(results, log_scale=args.log_scale, title=f"{name} ({source})")
        overview = save_figure(fig, out / f"erf_overview.{args.format}")
        progress.advance(task)

    maps = {path: r.heatmap.numpy() for path, r in results.flat().items()}
    save_npz(out / "maps.npz", {**maps, **metadata(args.mode)})
    written = []
    if tables:
        from erf_monitor.cli.tables import caption, rows_of, write_tables

        written = write_tables(rows_of(name, record), out, tables, caption(record))

    if preprocessing is not None:
        console.print(
            f"Images preprocessed by {_lit(preprocessing['source'])}: "
            f"{'x'.join(map(str, preprocessing['size']))} px, mean {preprocessing['mean']}, "
            f"std {preprocessing['std']}.",
            highlight=False,
        )
    title = f"ERF of {_lit(name)} — {_lit(source)}, mode {args.mode}"
    console.print(results_table(results, title=title))
    _write_positions(results, out, console, f"ERF at position {args.position!r}", args.format)
    from erf_monitor.cli.batch import write_json

    write_json(out / "metrics.json", record)  # last: a folder with metrics.json is finished
    shards = f" on {world} processes" if world > 1 else ""
    console.print(
        f"Probe: {seconds:.2f} s{shards}. Wrote [bold]{_lit(out / 'metrics.json')}[/], "
        f"[bold]{_lit(out / 'maps.npz')}[/] (np.load(..., allow_pickle=False)), "
        f"[bold]{_lit(overview)}[/]"
        + "".join(f", [bold]{_lit(p)}[/]" for p in written)
        + f" and {len(results)} heatmaps in [bold]{_lit(out / 'heatmaps')}[/].",
        highlight=False,
    )
    return record


#: The metrics whose bootstrap intervals ``analyze --bootstrap`` records (the table's).
_INTERVAL_METRICS = ("area_t20", "area_t30", "area_t50", "area_t99", "erf_size", "coverage")


def _intervals(r: ERFResult, args: argparse.Namespace) -> dict[str, dict[str, float | None]]:
    from erf_monitor.measure.bootstrap import bootstrap_metrics

    cis = bootstrap_metrics(
        r, list(_INTERVAL_METRICS), n_boot=args.bootstrap, level=args.level, seed=args.seed
    )
    return {
        k: {"value": _json_float(ci.value), "low": _json_float(ci.low),
            "high": _json_float(ci.high), "std": _json_float(ci.std)}
        for k, ci in cis.items()
    }  # fmt: skip


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
        f"Batch of {len(records)} models: one folder per model in [bold]{_lit(out)}[/]"
        + "".join(f", [bold]{_lit(p)}[/]" for p in written)
        + ".",
        highlight=False,
    )


# ---------------------------------------------------------------------------------- layers
def _cmd_layers(args: argparse.Namespace) -> int:
    import torch
    from rich.markup import escape
    from rich.table import Table

    from erf_monitor.cli.models import load_model
    from erf_monitor.targets.auto import pick_layers

    size = _parse_size(args.input_size)
    _check_device(args.device)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = load_model(args.model, num_classes=None).to(args.device).eval()
    x = torch.zeros(2, args.channels, *size, device=args.device)
    shapes: dict[str, str] = {}

    def hook(name: str) -> Any:
        def record(_m: Any, _inp: Any, out: Any) -> None:
            if name not in shapes:  # the first call, the one a probe measures
                ok = isinstance(out, torch.Tensor)
                shapes[name] = "x".join(map(str, out.shape[1:])) if ok else type(out).__name__

        return record

    named = [(n, m) for n, m in model.named_modules() if n]
    handles = [m.register_forward_hook(hook(n)) for n, m in named]
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:  # the model's own error, e.g. an input size it cannot take
        raise CLIError(f"the model failed on a {'x'.join(map(str, size))} input: "
                       f"{type(exc).__name__}: {_one_line(exc)}") from None  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    try:
        auto = set(pick_layers(model, x).names)
    except ValueError:
        auto = set()
    table = Table(
        title=f"Layers of {args.model} on a {'x'.join(map(str, size))} input",
        title_justify="left",
        header_style="bold",
        caption="output: shape without the batch dim (not run: the forward never called it); "
        "auto: what --layers auto picks (one per resolution stage).",
        caption_justify="left",
    )
    for col in ("layer", "type", "output", "auto"):
        table.add_column(col, style="cyan" if col == "layer" else None, no_wrap=col != "type")
    for name, module in named:
        table.add_row(escape(name), type(module).__name__, shapes.get(name, "not run"),
                      "yes" if name in auto else "")  # fmt: skip
    _console().print(table)
    return 0


# ---------------------------------------------------------------------------------- report
def _cmd_report(args: argparse.Namespace) -> int:
    from erf_monitor.cli.report import build_report

    path, runs = build_report(
        args.logdir,
        args.out,
        max_frames=args.frames,
        title=args.title,
        reference_coverage=args.min_coverage,
        dedupe=not args.keep_duplicates,
    )
    console = _console()
    console.print(
        f"Report of {len(runs)} run(s) written to [bold]{_lit(path)}[/] "
        f"({path.stat().st_size / 1024:.0f} KiB, self-contained: open it in any browser).",
        highlight=False,
    )
    return 0


# ---------------------------------------------------------------------------------- compare
def _cmd_compare(args: argparse.Namespace) -> int:
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from erf_monitor.cli.compare import (
        LineSteps,
        RichSteps,
        Steps,
        compare_models,
        comparison_table,
        load_state,
        split_spec,
        write_comparison,
    )
    from erf_monitor.cli.models import load_model
    from erf_monitor.core.errors import ERFProbeError

    _check_device(args.device)
    if args.samples < 2:
        raise CLIError(f"--samples must be >= 2 for intervals, got {args.samples}")
    if args.bootstrap < 2:
        raise CLIError(f"--bootstrap must be >= 2, got {args.bootstrap}")
    if not 0.0 < args.level < 1.0:
        raise CLIError(f"--level must be in (0, 1), got {args.level}")
    if args.num_classes is not None and args.num_classes < 1:
        raise CLIError(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.images is not None and args.input != "noise":
        raise CLIError("give either --images DIR or --input FILE, not both")
    if args.images is None and (args.size or args.mean or args.std):
        raise CLIError("--size/--mean/--std preprocess --images; for noise use --input-size")
    names = [n.strip() for n in args.names.split(",")] if args.names else list(args.models)
    if len(names) != len(args.models):
        raise CLIError(f"--names has {len(names)} names for {len(args.models)} models")
    size = _parse_size(args.input_size)
    err = _console(stderr=True)
    live = err.is_terminal and not args.quiet
    t0 = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not live,
    ) as display:
        steps: Steps | None = None
        if live:
            steps = RichSteps(display)
        elif not args.quiet:  # logs and pipes: one line per finished step
            steps = LineSteps(err)
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
        preprocessing = None
        if args.images is not None:  # preprocessed as the first model expects: the same
            first = split_spec(args.models[0])[0]  # images for every model
            x, source, preprocessing = _load_images(args, models[0][1], first)
        else:
            x, source = _load_inputs(args, size)
        build_s = time.perf_counter() - t0
        if not live and not args.quiet:
            err.print(
                f"probing {len(models)} model(s) on {x.shape[0]} {_lit(source)} image(s); "
                f"{args.bootstrap} bootstrap resamples per layer...",
                highlight=False,
            )
        try:
            comp = compare_models(
                models,
                x.to(args.device),
                _layer_spec(args.layers),
                mode=args.mode,
                n_boot=args.bootstrap,
                level=args.level,
                method=args.method,
                seed=args.seed,
                chunk_size=args.chunk_size,
                progress=steps,
            )
        except (ValueError, TypeError, ERFProbeError) as exc:
            raise CLIError(_short_error(exc, split_spec(args.models[0])[0])) from None
        if steps is not None:
            steps.start("writing compare.png, compare.json, maps.npz")
        t1 = time.perf_counter()
        meta = {
            "specs": list(args.models),
            "weights": "random init" if args.pretrained is None else args.pretrained,
            "input": source,
            "preprocessing": preprocessing,
            "mode": args.mode,
            "seed": args.seed,
        }
        paths = write_comparison(
            comp, args.out, log_scale=args.log_scale, meta=meta, fmt=args.format
        )
        write_s = time.perf_counter() - t1
        if steps is not None:
            steps.done()
    console = _console()
    if preprocessing is not None:
        console.print(
            f"Images preprocessed by {_lit(preprocessing['source'])}: "
            f"{'x'.join(map(str, preprocessing['size']))} px, mean {preprocessing['mean']}, "
            f"std {preprocessing['std']}.",
            highlight=False,
        )
    console.print(comparison_table(comp))
    probe_s = sum(v for k, v in comp.seconds.items() if k.startswith("probe "))
    boot_s = sum(v for k, v in comp.seconds.items() if k.startswith("bootstrap "))
    console.print(
        f"Time: {time.perf_counter() - t0:.1f} s (models and images {build_s:.1f} s, probes "
        f"{probe_s:.1f} s, bootstrap {boot_s:.1f} s, outputs {write_s:.1f} s). Wrote "
        + ", ".join(f"[bold]{_lit(p)}[/]" for p in paths.values())
        + ".",
        highlight=False,
    )
    return 0


# ---------------------------------------------------------------------------------- replay
def _cmd_replay(args: argparse.Namespace) -> int:
    """``erf-monitor replay``: :func:`erf_monitor.cli.replay.replay` on a MODEL spec."""
    import torch
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from erf_monitor.cli.compare import LineSteps, RichSteps, Steps
    from erf_monitor.cli.models import load_model
    from erf_monitor.cli.replay import ReplayError, find_checkpoints, logger_sinks, replay
    from erf_monitor.core.errors import ERFProbeError
    from erf_monitor.targets.positions import parse_position_text

    if args.pretrained is not None:
        raise CLIError("replay loads the weights of each CKPT; --pretrained is not used")
    _check_probe_inputs(args)
    cov = args.min_coverage.strip().lower()
    try:
        min_coverage = None if cov in ("none", "off", "0") else float(cov)
    except ValueError:
        raise CLIError(f"--min-coverage must be a fraction or none, got {cov!r}") from None
    try:
        position = parse_position_text(args.position)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"--position: {_one_line(exc)}") from None
    checkpoints = find_checkpoints(args.checkpoints)
    with torch.random.fork_rng():  # seeded, without touching the caller's RNG
        torch.manual_seed(args.seed)
        model = load_model(args.model, num_classes=args.num_classes)
    if args.images is not None:
        x, source, _ = _load_images(args, model, args.model)
    else:
        x, source = _load_inputs(args, _parse_size(args.input_size))
    from erf_monitor.cli.batch import setup_distributed, teardown_distributed
    from erf_monitor.probe.distributed import rank_and_world

    out = Path(args.out)
    started, device = setup_distributed(args.device)  # torchrun: checkpoints shared
    try:
        rank, world = rank_and_world()
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        err = _console(stderr=True, quiet=rank != 0)
        live = err.is_terminal and not args.quiet and rank == 0
        if not args.quiet:
            shards = f" on {world} processes" if world > 1 else ""
            err.print(
                f"Replaying {len(checkpoints)} checkpoint(s) of {args.model} (steps "
                f"{', '.join(str(c.step) for c in checkpoints)}) on {x.shape[0]} {source} "
                f"image(s){shards}.",
                highlight=False,
                markup=False,
            )
        try:
            sinks, finish = logger_sinks(args.logger, out) if rank == 0 else ([], lambda: None)
        except (ReplayError, ModuleNotFoundError) as exc:
            raise CLIError(_one_line(exc)) from None
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
            console=err, transient=True, disable=not live,
        ) as display:  # fmt: skip
            steps: Steps | None = RichSteps(display) if live else None
            if not live and not args.quiet and rank == 0:
                steps = LineSteps(err)
            try:
                run = replay(
                    model.to(device), [c.path for c in checkpoints], _layer_spec(args.layers),
                    inputs=x.to(device), out=out, logger=sinks or None,
                    skip_existing=args.skip_existing, progress=steps, mode=args.mode,
                    position=position, min_coverage=min_coverage, patience=args.patience,
                    chunk_size=args.chunk_size, seed=args.seed,
                )  # fmt: skip
            except (ValueError, TypeError, ERFProbeError) as exc:  # (a ReplayError included)
                raise CLIError(_one_line(exc)) from None
            finally:
                finish()
    finally:
        teardown_distributed(started)
    if rank != 0:
        return 0
    skipped = len(checkpoints) - len(run.probed)
    _console().print(
        f"Probed {len(run.probed)} checkpoint(s)"
        + (f" ({skipped} done before, skipped)" if skipped else "")
        + f"; the run is in [bold]{out}[/] (erf-monitor report {out}).",
        highlight=False,
    )
    return 0


# ---------------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> int:
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
        console=_console(),
    )
    return 0


# ---------------------------------------------------------------------------------- parser
def _add_probe_options(
    parser: argparse.ArgumentParser,
    *,
    samples: int,
    samples_help: str = "probe batch size",
    layers_help: str = "layer names or globs",
    size_help: str = "N or HxW",
    input_help: str = "noise (seeded) or a .npy file, loaded without pickle",
) -> None:
    """The options that say what is probed, shared by analyze, compare and replay."""
    parser.add_argument("--layers", nargs="+", default=["auto"], help=layers_help)
    parser.add_argument("--input-size", default="224", help=size_help, metavar="SIZE")
    parser.add_argument("--channels", type=int, default=3, help="input channels for noise")
    parser.add_argument("--samples", type=int, default=samples, help=samples_help)
    parser.add_argument("--mode", choices=MODES, default="luo", help="ERF convention (MODE below)")
    parser.add_argument("--input", default="noise", help=input_help)


def _parser() -> argparse.ArgumentParser:
    from erf_monitor import __version__

    parser = _Parser(
        prog="erf-monitor",
        description="Measure and watch the effective receptive field (ERF) of vision models.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"erf-monitor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train a small-RF and a large-RF CNN on a task that needs a large ERF (CPU, minutes)",
        description=_wrap(
            "Train two small CNNs on a synthetic task (brighter or darker? a faint shift of "
            "every pixel of 128x128 noise) read out at the centre unit, which must average over "
            "a large region around the centre: the 'large' variant (dilated residual blocks) "
            "grows its ERF from 7 to 115-117 px (seed 0, 200 steps; the torch build moves the "
            "last digits) and learns the task; the "
            "'small' one (no dilation, TRF 71 px) cannot cover enough of the image and gets "
            "the coverage alert. ERFMonitor logs to TensorBoard, W&B or CSV files and writes "
            "every heatmap as a PNG file; a table and an HTML report follow."
        ),
        formatter_class=_Formatter,
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
    demo.set_defaults(func=_cmd_demo)

    from erf_monitor.viz.export import FORMATS

    analyze = sub.add_parser(
        "analyze",
        help="ERF and TRF of a model's layers on noise or your images",
        description=_wrap(
            "Probe the centre-pixel ERF of chosen layers of a model (random init, or local "
            "pretrained weights) on noise, a .npy array or a folder of images; print a table, "
            "write heatmaps, an overview figure (--format png, pdf or svg), raw maps (maps.npz), "
            "metrics.json and, with --table, RepLKNet-style tables. Several models: one folder "
            "each, a combined table and a models x layers grid figure; --skip-existing resumes "
            "an interrupted batch. Launched with 'torchrun --nproc_per_node N -m erf_monitor.cli "
            "analyze ...', the probe images are sharded over the N processes (gloo on CPU, NCCL "
            "with --device cuda) and rank 0 writes."
        ),
        epilog=_MODEL_HELP + "\n" + _MODE_HELP,
        formatter_class=_Formatter,
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
    _add_probe_options(
        analyze,
        samples=8,
        layers_help="layer names or globs (quote them: 'layer*'), or auto (one per resolution "
        "stage)",
        size_help="N or HxW (default: %(default)s)",
        input_help="noise (standard Gaussian, seeded) or a .npy file (N,C,H,W), (C,H,W) or "
        "(H,W), loaded without pickle",
    )
    _add_model_inputs(
        analyze,
        images="preprocessed as the model expects",
        weights="load weights: alone, the model's",
        checkpoints="for --pretrained=PATH checkpoints fine-tuned on N classes",
    )
    analyze.add_argument(
        "--position",
        default="centre",
        metavar="POS",
        help="seed unit(s): centre (default), corners, edges, grid:K (a K x K grid), an output "
        "index I,J (negative from the end), a fraction of the output plane 0.0,0.5, or several "
        "separated by ';'. Sets also write fields/<layer>.png (the ERF field)",
    )
    analyze.add_argument("--seed", type=int, default=0, help="seeds model init and noise")
    analyze.add_argument("--chunk-size", type=int, default=None, help="samples per backward")
    analyze.add_argument("--device", default="cpu", help="torch device")
    analyze.add_argument("--log-scale", action="store_true", help="log colour scale for images")
    analyze.add_argument(
        "--format",
        choices=FORMATS,
        default="png",
        help="figure format: pdf and svg are vector files for papers (the annotated "
        "heatmaps/<layer>.png are written too)",
    )
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
    analyze.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip models whose folder already holds a finished run with the same settings "
        "(resume an interrupted batch)",
    )
    analyze.add_argument("--out", default="erf_analysis", help="output directory")
    analyze.add_argument("--quiet", action="store_true", help="no progress display")
    analyze.set_defaults(func=_cmd_analyze)

    layers = sub.add_parser(
        "layers",
        help="list a model's layer names with their output shapes",
        description=_wrap(
            "Every named module of MODEL (the names --layers takes), its type, its output "
            "shape on a zero input of --input-size, and which ones --layers auto picks."
        ),
        epilog=_MODEL_HELP,
        formatter_class=_Formatter,
    )
    layers.add_argument("model", metavar="MODEL", help="see below")
    layers.add_argument("--input-size", default="224", help="N or HxW", metavar="SIZE")
    layers.add_argument("--channels", type=int, default=3, help="input channels")
    layers.add_argument("--device", default="cpu", help="torch device")
    layers.set_defaults(func=_cmd_layers)

    report = sub.add_parser(
        "report",
        help="one self-contained HTML page from ERFMonitor logs and analyze outputs",
        description=_wrap(
            "Find every run under LOGDIR (FileSink directories with metrics.csv, CSVLogger's "
            "erf/ folders, TensorBoard event files, 'erf-monitor analyze --out' folders) and "
            "write one HTML page: runs side by side (one plot per layer they share), then per "
            "run growth curves of ERF size, ERF/TRF ratio and coverage (with min_coverage or a "
            "reference line) and heatmap filmstrips. Runs with identical ERF data are shown "
            "once. Nothing outside LOGDIR is read: symbolic links out of it are ignored."
        ),
        formatter_class=_Formatter,
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
    report.set_defaults(func=_cmd_report)

    compare = sub.add_parser(
        "compare",
        help="several models or checkpoints on one probe set, with bootstrap intervals",
        description=_wrap(
            "Probe every MODEL[@CHECKPOINT] on the same images, print per layer ERF size, "
            "coverage, ERF/TRF ratio and sigma with bootstrap confidence intervals over the "
            "probe images, and the paired difference to the first model (bold when its "
            "interval excludes 0); write compare.png (maps side by side and difference "
            "maps), compare.json (every metric's interval) and maps.npz."
        ),
        epilog=_MODEL_HELP.replace(
            "No weights",
            "  MODEL@CKPT               MODEL with the weights of CKPT (a state dict or a\n"
            "                           Lightning checkpoint; torch.load(weights_only=True))\n"
            "No weights",
        )
        + "\n"
        + _MODE_HELP,
        formatter_class=_Formatter,
    )
    compare.add_argument("models", metavar="MODEL", nargs="+", help="see below")
    compare.add_argument("--names", default=None, help="comma-separated names (default: the specs)")
    _add_probe_options(compare, samples=32, samples_help="probe images")
    _add_model_inputs(
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
    compare.add_argument("--seed", type=int, default=0, help="seeds model init, noise, resamples")
    compare.add_argument("--chunk-size", type=int, default=None, help="samples per backward")
    compare.add_argument("--device", default="cpu", help="torch device")
    compare.add_argument("--log-scale", action="store_true", help="log colour scale")
    compare.add_argument(
        "--format", choices=FORMATS, default="png", help="figure format (pdf, svg: vector)"
    )
    compare.add_argument("--out", default="erf_compare", help="output directory")
    compare.add_argument("--quiet", action="store_true", help="no progress display")
    compare.set_defaults(func=_cmd_compare)

    replay = sub.add_parser(
        "replay",
        help="the ERF growth of a finished run, from its checkpoints",
        description=_wrap(
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
        epilog=_MODEL_HELP + "\n" + _MODE_HELP,
        formatter_class=_Formatter,
    )
    replay.add_argument("model", metavar="MODEL", help="the architecture (see below)")
    replay.add_argument("checkpoints", metavar="CKPT", nargs="+", help="checkpoint files/folders")
    _add_probe_options(replay, samples=8)
    _add_model_inputs(
        replay,
        images="preprocessed as MODEL expects; the same images for every checkpoint",
        weights="",
        checkpoints="for checkpoints trained on N classes",
    )
    for action in replay._actions:  # each CKPT holds the weights: refused, not advertised
        if action.dest == "pretrained":
            action.help = argparse.SUPPRESS
    replay.add_argument("--position", default="centre", metavar="POS", help="seed unit(s)")
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
    replay.add_argument("--seed", type=int, default=0, help="seeds model init and noise")
    replay.add_argument("--chunk-size", type=int, default=None, help="samples per backward")
    replay.add_argument("--device", default="cpu", help="torch device")
    replay.add_argument(
        "--skip-existing", action="store_true", help="resume: skip steps probed already in --out"
    )
    replay.add_argument("--out", default="erf_replay", help="run folder")
    replay.add_argument("--quiet", action="store_true", help="no progress display")
    replay.set_defaults(func=_cmd_replay)
    return parser


def _add_model_inputs(
    parser: argparse.ArgumentParser, *, images: str, weights: str, checkpoints: str
) -> None:
    """The options ``analyze`` and ``compare`` share: real images and how they are
    preprocessed, local weights and the head's size (the help texts name who they apply to)."""
    parser.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help=f"a folder of images (searched recursively; the first --samples are used), {images}",
    )
    parser.add_argument("--size", default=None, help="image size N or HxW (with --images)")
    parser.add_argument("--mean", default=None, help="per-channel mean, e.g. 0.5,0.5,0.5")
    parser.add_argument("--std", default=None, help="per-channel std, e.g. 0.5,0.5,0.5")
    parser.add_argument(
        "--pretrained",
        nargs="?",
        const="cache",
        default=None,
        metavar="PATH",
        help=f"{weights} pretrained weights from the local torch.hub / Hugging Face cache "
        "(never downloaded); =PATH, a checkpoint file",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        metavar="N",
        help=f"build torchvision/timm models with an N-class head ({checkpoints})",
    )


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``erf-monitor`` command line.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 2 for usage errors (one line on stderr).
    """
    parser = _parser()
    try:
        args, extras = parser.parse_known_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, --version, argparse usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    if extras:  # the subcommand's usage, not the top level's, and the closest option
        sub = _subparser(parser, args.command)
        sub.print_usage(sys.stderr)
        message = _unknown_options(sub, extras)
        print(f"erf-monitor {args.command}: error: {message}", file=sys.stderr)
        return 2
    if args.command == "analyze" and not args.model:
        # "--pretrained MODEL" reads MODEL as the weights path: give it back.
        pre = args.pretrained
        if pre not in (None, "cache") and not Path(pre).is_file() and ":" in pre:
            args.model, args.pretrained = [pre], "cache"
        else:
            print("erf-monitor analyze: error: MODEL is required (see --help)", file=sys.stderr)
            return 2
    try:
        return int(args.func(args))
    except CLIError as exc:
        print(f"erf-monitor {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("erf-monitor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
