"""A k x k grid of seed positions in one probe vs k^2 separate single-position probes.

Run ``python benchmarks/bench_positions.py`` (``--quick`` for a smoke run; ``--threads 1`` on
a shared machine). Both variants compute the same maps (checked at the end of the run) on the
same probe images; they run interleaved, once per repeat in a rotating order, and the ratios
of their medians are printed, in process CPU time (fair on a shared machine) and wall time.
Variants:

* ``grid``: ``compute_erf(..., position="grid:k")``: one plan for all k^2 units (+ the
  centre) of every layer, units sharing forwards and (with disjoint TRFs) backwards.
* ``separate``: k^2 calls ``compute_erf(..., position=(i, j))`` per layer, one per grid unit
  (each with the default cropping, like a centre-pixel probe at another unit).

Each is timed twice: ``fresh``, as the first calls on a model (the plan cache is emptied before
every call: layers resolved and TRFs analysed each time), and ``cached``, with every call's
plan built beforehand (the cache is enlarged for the run so that all k^2 x layers separate
plans stay in it). The maps agree up to float32 rounding: cropped convolutions sum in another
order, which can flip a few ReLUs of near-zero pre-activations of a random-init model (the
same comparison in float64 is exact). "backwards" counts input-only backward passes (per
packed class and sample chunk).
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
from torch import nn

import erf_monitor as em
from erf_monitor.probe import plan as _plan
from erf_monitor.probe import seeds as _seeds
from erf_monitor.targets.positions import request


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
    res = em.compute_erf(model, x, list(layers), position=f"grid:{k}")
    req = request(f"grid:{k}", 2)
    # One separate probe per grid unit; a unit index differs per layer, so each call probes
    # one layer at one unit (k^2 x layers calls).
    calls = []
    for p in req.positions:
        for name in layers:
            field = res[name].field
            assert field is not None
            calls.append((name, field[p.key].output_index))

    def grid() -> Any:
        return em.compute_erf(model, x, list(layers), position=f"grid:{k}")

    def separate() -> list[Any]:
        return [em.compute_erf(model, x, [name], position=index) for name, index in calls]

    def fresh(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            real = em.compute_erf

            def first_call(*args: Any, **kwargs: Any) -> Any:
                _plan._cache.clear()  # as on a model never seen: the plan is built again
                return real(*args, **kwargs)

            em.compute_erf = first_call  # type: ignore[assignment]
            try:
                return fn()
            finally:
                em.compute_erf = real  # type: ignore[assignment]

        return run

    variants = {
        "grid fresh": fresh(grid),
        "separate fresh": fresh(separate),
        "grid cached": grid,
        "separate cached": separate,
    }

    keep = _plan._PLANS_PER_MODEL
    _plan._PLANS_PER_MODEL = len(calls) + 8  # every separate plan stays cached
    try:
        grid(), separate()  # the cached variants' plans
        cpu, wall = interleaved_cpu(variants, repeats)
        # The same maps either way.
        res, alone = grid(), separate()
        n_back = {"grid": count_backwards(grid), "separate": count_backwards(separate)}
    finally:
        _plan._PLANS_PER_MODEL = keep
    worst = 0.0
    for (name, index), single in zip(calls, alone):
        field = res[name].field
        assert field is not None
        a, b = field.at(index).heatmap.double(), single[name].heatmap.double()
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    med = {
        clock: {name: statistics.median(ts) for name, ts in times.items()}
        for clock, times in (("cpu", cpu), ("wall", wall))
    }
    ratios = {
        f"{clock} {plans}": med[clock][f"separate {plans}"] / med[clock][f"grid {plans}"]
        for clock in ("cpu", "wall")
        for plans in ("fresh", "cached")
    }
    return {
        "model": model_name,
        "size": size,
        "layers": list(layers),
        "k": k,
        "samples": samples,
        "threads": torch.get_num_threads(),
        "cpu_s": cpu,
        "wall_s": wall,
        "median": med,
        "ratio": ratios,
        "backwards": n_back,
        "units": len(calls),
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

    console = Console(width=120)
    console.print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    rows = []
    for size, layers in cases:
        rows.append(run_case(args.model, size, layers, args.k, args.samples, args.repeats))
    table = Table(title=f"{args.model}: {args.k}x{args.k} grid vs separate probes (CPU)")
    for col in ("size", "layers", "plans", "variant", "CPU s", "wall s", "backwards",
                "separate / grid CPU", "wall"):  # fmt: skip
        table.add_column(col, justify="right")
    for row in rows:
        for plans in ("fresh", "cached"):
            for variant in ("grid", "separate"):
                name = f"{variant} {plans}"
                table.add_row(
                    str(row["size"]),
                    ", ".join(row["layers"]),
                    plans,
                    variant,
                    f"{row['median']['cpu'][name]:.2f}",
                    f"{row['median']['wall'][name]:.2f}",
                    str(row["backwards"][variant]),
                    f"{row['ratio'][f'cpu {plans}']:.2f}" if variant == "grid" else "",
                    f"{row['ratio'][f'wall {plans}']:.2f}" if variant == "grid" else "",
                )
    console.print(table)
    for row in rows:
        console.print(
            f"{row['size']} px, {', '.join(row['layers'])}: {row['units']} separate calls; "
            f"max relative difference between the maps {row['max_rel_diff']:.1e}; "
            "border_ratio " + ", ".join(f"{k} {v:.2f}" for k, v in row["border_ratio"].items())
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
