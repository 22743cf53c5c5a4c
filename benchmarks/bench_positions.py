"""A k x k grid of seed positions in one probe vs k^2 separate single-position probes.

Run ``python benchmarks/bench_positions.py`` (``--quick`` for a smoke run). Both variants
compute the same maps (checked at the end of the run) on the same probe images; they run
interleaved, once per repeat in a rotating order, and the ratio of their medians is
printed, so load from other processes hits both alike. Variants:

* ``grid``: ``compute_erf(..., position="grid:k")``: one forward per layer (or crop window)
  for all k^2 units (+ the centre), units with disjoint TRFs sharing one backward.
* ``separate``: k^2 calls ``compute_erf(..., position=(i, j))`` per layer, one per grid unit
  (each with the default cropping, like a centre-pixel probe at another unit).

Both are timed with their TRFs given (the probe alone); the ratio with the TRF analysis
included (what fresh ``compute_erf`` calls cost) is printed after the table. The maps agree
up to float32 rounding: cropped convolutions sum in another order, which can flip a few ReLUs
of near-zero pre-activations of a random-init model (the same comparison in float64 is
exact). "backwards" counts input-only backward passes (per packed class and sample chunk).

TRFs are precomputed once for both (as the monitor caches them); the one-off analysis of
all units in one trace (``theoretical_rfs``) vs one ``theoretical_rf`` call per unit is
timed separately (``analysis_*``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from _timing import interleaved
from torch import nn

import erf_monitor as em
from erf_monitor.probe import seeds as _seeds
from erf_monitor.targets.positions import request
from erf_monitor.trf.analysis import theoretical_rfs


def setup(model_name: str, size: int, samples: int, seed: int = 0) -> tuple[nn.Module, Any]:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, model_name)().eval()
    x = torch.randn(samples, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return model, x


def count_backwards(fn: Callable[[], Any]) -> int:
    """How many input-only backward passes ``fn`` runs (one per packed class and chunk)."""
    count = 0
    real = _seeds.class_grads

    def counting(values: Sequence[torch.Tensor], *args: Any) -> Any:
        nonlocal count
        count += len(values)
        return real(values, *args)

    _seeds.class_grads = counting  # type: ignore[assignment]
    try:
        fn()
    finally:
        _seeds.class_grads = real  # type: ignore[assignment]
    return count


def run_case(
    model_name: str, size: int, layers: Sequence[str], k: int, samples: int, repeats: int
) -> dict[str, Any]:
    model, x = setup(model_name, size, samples)
    shape = tuple(x.shape[1:])
    req = request(f"grid:{k}", 2)
    t0 = time.perf_counter()
    units = theoretical_rfs(model, shape, layers, req)
    analysis_grid = time.perf_counter() - t0
    grid_trfs = {name: tuple(u.values()) for name, u in units.items()}
    indices = [{name: units[name][p.key].output_centre for name in layers} for p in req.positions]
    # One separate probe per grid unit; a unit index differs per layer, so each call probes
    # one layer at one unit (k^2 x layers calls), each with that unit's TRF.
    calls = [
        (name, idx[name], units[name][p.key])
        for p, idx in zip(req.positions, indices)
        for name in layers
    ]
    t0 = time.perf_counter()
    for name, index, _ in calls[: len(layers)]:  # one unit's analysis, times k^2 below
        em.theoretical_rf(model, shape, [name], position=index)
    analysis_separate = (time.perf_counter() - t0) * len(req.positions)

    def grid() -> Any:
        return em.compute_erf(model, x, list(layers), position=f"grid:{k}", trf=grid_trfs)

    def separate() -> list[Any]:
        return [
            em.compute_erf(model, x, [name], position=index, trf={name: trf})
            for name, index, trf in calls
        ]

    times = interleaved({"grid": grid, "separate": separate}, repeats)
    # The same maps either way.
    res, alone = grid(), separate()
    worst = 0.0
    for (name, index, _), single in zip(calls, alone):
        field = res[name].field
        assert field is not None
        r = field.at(index)
        a, b = r.heatmap.double(), single[name].heatmap.double()
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    n_back = {"grid": count_backwards(grid), "separate": count_backwards(separate)}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    total_grid = med["grid"] + analysis_grid
    total_separate = med["separate"] + analysis_separate
    return {
        "model": model_name,
        "size": size,
        "layers": list(layers),
        "k": k,
        "samples": samples,
        "times": times,
        "median": med,
        "ratio": med["separate"] / med["grid"],
        "ratio_with_analysis": total_separate / total_grid,
        "backwards": n_back,
        "units": len(calls),
        "analysis_grid_s": analysis_grid,
        "analysis_separate_s": analysis_separate,
        "max_rel_diff": worst,
        "border_ratio": {name: res[name].field.border_ratio for name in layers},  # type: ignore[union-attr]
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["224:layer2,layer3", "448:layer3", "640:layer1,layer2"],
        help="SIZE:LAYER[,LAYER...] per case (default: %(default)s)",
    )
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="resnet18, 96 px, k=3, 1 repeat")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.model, args.cases, args.k = "resnet18", ["96:layer2,layer3"], 3
        args.repeats, args.samples = 1, 2
    cases = [(int(c.split(":")[0]), c.split(":")[1].split(",")) for c in args.cases]
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    rows = []
    for size, layers in cases:
        rows.append(run_case(args.model, size, layers, args.k, args.samples, args.repeats))
    table = Table(title=f"{args.model}: {args.k}x{args.k} grid vs separate probes (CPU)")
    for col in (
        "size",
        "layers",
        "variant",
        "median s",
        "repeats s",
        "backwards",
        "separate / grid",
    ):
        table.add_column(col, justify="right")
    for row in rows:
        for variant in ("grid", "separate"):
            table.add_row(
                str(row["size"]),
                ", ".join(row["layers"]),
                variant,
                f"{row['median'][variant]:.2f}",
                " ".join(f"{t:.2f}" for t in row["times"][variant]),
                str(row["backwards"][variant]),
                f"{row['ratio']:.2f}" if variant == "grid" else "",
            )
    console.print(table)
    for row in rows:
        console.print(
            f"{row['size']} px, {', '.join(row['layers'])}: TRF analysis of all "
            f"{row['units']} units "
            f"{row['analysis_grid_s']:.2f} s in one trace vs about "
            f"{row['analysis_separate_s']:.1f} s one unit at a time (with it: separate / grid "
            f"{row['ratio_with_analysis']:.2f}); max relative difference "
            f"between the maps {row['max_rel_diff']:.1e}; border_ratio "
            + ", ".join(f"{k} {v:.2f}" for k, v in row["border_ratio"].items())
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
