"""Lean input-only backwards (``probe/lean.py``) on vs off, for the probes users run.

Run ``python benchmarks/bench_lean.py`` (``--quick`` for a smoke run; ``--threads 1`` on a
shared machine). Each case is one ``compute_erf`` call with cached plans, timed with the lean
backwards on and off (``lean_modules`` returning nothing: autograd's own kernels
everywhere), **interleaved in one run** (rotating order, medians), in process CPU time (fair
on a shared machine) and wall time; the maps of both are compared at the end. Cases:

* ``centre``: the monitor's default probe, the centre unit of 4 stages, cropped (default);
* ``grid:3``: a 3 x 3 grid of units of 2 stages (``position="grid:3"``);
* ``centre, crop=False``: the centre unit of 4 stages, every backward on the full input.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from _timing import interleaved_cpu

import erf_monitor as em
from erf_monitor.probe import run as _run


def _off() -> Callable[[], None]:
    real = _run.lean_modules
    _run.lean_modules = lambda index: ()

    def restore() -> None:
        _run.lean_modules = real

    return restore


def run_case(
    model_name: str, size: int, samples: int, name: str, kwargs: dict[str, Any], repeats: int
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)().eval()
    x = torch.randn(samples, 3, size, size, generator=torch.Generator().manual_seed(0))

    def call() -> Any:
        return em.compute_erf(model, x, **kwargs)

    def lean_off() -> Any:
        restore = _off()
        try:
            return call()
        finally:
            restore()

    call()  # the plan, cached for both variants
    cpu, wall = interleaved_cpu({"lean": call, "off": lean_off}, repeats)
    a, b = call(), lean_off()
    worst = 0.0
    for layer in b:
        fa, fb = a[layer].field, b[layer].field
        pairs = [(a[layer], b[layer])]
        if fa is not None and fb is not None:
            pairs = [(fa[k], fb[k]) for k in fb]
        for ra, rb in pairs:
            ha, hb = ra.heatmap.double(), rb.heatmap.double()
            worst = max(worst, float((ha - hb).abs().max() / hb.abs().max()))
    med = {
        clock: {n: statistics.median(ts) for n, ts in times.items()}
        for clock, times in (("cpu", cpu), ("wall", wall))
    }
    return {
        "case": name,
        "model": model_name,
        "size": size,
        "samples": samples,
        "threads": torch.get_num_threads(),
        "cpu_s": cpu,
        "wall_s": wall,
        "median": med,
        "ratio": {c: med[c]["off"] / med[c]["lean"] for c in ("cpu", "wall")},
        "max_rel_diff": worst,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="resnet18, 64 px, 1 repeat")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.model, args.size, args.samples, args.repeats = "resnet18", 64, 2, 1
    stages = ["layer1", "layer2", "layer3", "layer4"]
    cases: dict[str, dict[str, Any]] = {
        "centre": {"layers": stages},
        "grid:3": {"layers": ["layer2", "layer3"], "position": "grid:3"},
        "centre, crop=False": {"layers": stages, "crop": False},
    }
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    console.print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    rows = [
        run_case(args.model, args.size, args.samples, name, kw, args.repeats)
        for name, kw in cases.items()
    ]
    table = Table(title=f"{args.model}, {args.size} px, {args.samples} images: lean backwards")
    for col in ("case", "CPU s lean", "CPU s off", "off / lean CPU", "wall", "max rel diff"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(
            row["case"],
            f"{row['median']['cpu']['lean']:.3f}",
            f"{row['median']['cpu']['off']:.3f}",
            f"{row['ratio']['cpu']:.2f}",
            f"{row['ratio']['wall']:.2f}",
            f"{row['max_rel_diff']:.1e}",
        )
    console.print(table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
