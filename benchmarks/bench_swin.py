"""Swin: the analytic TRF through shifted windows vs the numeric method it replaces.

Run ``python benchmarks/bench_swin.py`` (``--quick`` for a smoke run without the slow numeric
variants, ``--no-numeric`` to skip them at full size). Variants run interleaved, once per
repeat in a rotating order after one untimed warm-up run each, so that load from other
processes hits them alike; medians and their ratios are printed (rich tables) and optionally
written as JSON (``--json``).

* ``trf``: ``theoretical_rf`` of torchvision ``swin_t``'s four stages (channels-last layout):
  ``fx`` (the fx walk through ``torch.roll``, window partitions and masked window attention)
  vs ``numeric`` (``method="numeric"``, what every Swin got before: fx could not trace it).
* ``probe``: one ``compute_erf`` of timm ``swin_tiny_patch4_window7_224``'s four stages on
  ``--samples`` images, the TRF analysis included: ``probe`` (fx TRFs) vs ``probe_numeric``
  (numeric TRFs, the old fallback); ``probe_only`` is the probe with the TRFs given (the part
  no TRF method changes).

Every timed call gets a model it has never seen (a copy made before the clock starts):
``compute_erf`` and ``theoretical_rf`` keep the plans they build per model, so a second call
on the same model would time no analysis at all.

The TRFs of both methods are compared per stage (centre unit): the numeric method counts the
``exp(-100)``-sized gradients through Swin's masked logits as support (see
``erf_monitor/trf/masks.py`` for the decision), so they may differ where a field reaches a
shifted window split by the mask.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from _timing import interleaved

import erf_monitor as em

CL = em.TokenLayout(channels_last=True)
TV_LAYERS = ["features.1", "features.3", "features.5", "features.7"]
TIMM_LAYERS = ["layers.0", "layers.1", "layers.2", "layers.3"]


def copies(model: torch.nn.Module, n: int) -> Callable[[], torch.nn.Module]:
    """A supply of ``n`` fresh copies of ``model``, made now (not on the clock)."""
    pool = [copy.deepcopy(model) for _ in range(n)]
    return pool.pop


def trf_case(size: int, repeats: int, numeric: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torchvision.models.swin_t().eval()
    shape = (3, size, size)

    def run(method: str) -> Callable[[], Any]:
        fresh = copies(model, repeats + 2)

        def fn() -> Any:
            return em.theoretical_rf(fresh(), shape, TV_LAYERS, token_layout=CL, method=method)  # type: ignore[arg-type]

        return fn

    variants = {"fx": run("fx")}
    if numeric:
        variants["numeric"] = run("numeric")
    times = interleaved(variants, repeats, warmup=True)
    fx = run("fx")()
    agree = {}
    if numeric:
        num = run("numeric")()
        agree = {name: fx[name].clipped == num[name].clipped for name in TV_LAYERS}
    return {
        "case": "trf",
        "model": "torchvision swin_t",
        "size": size,
        "times_s": times,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "fx": {name: str(t) for name, t in fx.items()},
        "clipped_agree": agree,
    }


def probe_case(size: int, samples: int, repeats: int, numeric: bool) -> dict[str, Any]:
    import timm

    torch.manual_seed(0)
    kwargs = {} if size == 224 else {"img_size": size}
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs).eval()
    x = torch.randn(samples, 3, size, size, generator=torch.Generator().manual_seed(0))
    shape = (3, size, size)
    trfs = em.theoretical_rf(model, shape, TIMM_LAYERS, token_layout=CL)

    fresh, fresh_numeric = copies(model, repeats + 1), copies(model, repeats + 1)

    def probe() -> Any:
        return em.compute_erf(fresh(), x, TIMM_LAYERS, token_layout=CL)

    def probe_only() -> Any:
        return em.compute_erf(model, x, TIMM_LAYERS, token_layout=CL, trf=trfs)

    def probe_numeric() -> Any:
        net = fresh_numeric()
        numeric_trfs = em.theoretical_rf(net, shape, TIMM_LAYERS, token_layout=CL, method="numeric")
        return em.compute_erf(net, x, TIMM_LAYERS, token_layout=CL, trf=numeric_trfs)

    variants = {"probe": probe, "probe_only": probe_only}
    if numeric:
        variants["probe_numeric"] = probe_numeric
    times = interleaved(variants, repeats, warmup=True)
    return {
        "case": "probe",
        "model": "timm swin_tiny_patch4_window7_224",
        "size": size,
        "samples": samples,
        "times_s": times,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-numeric", action="store_true", help="skip the numeric variants")
    parser.add_argument(
        "--quick", action="store_true", help="64 px, 2 samples, 1 repeat, no numeric variants"
    )
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.size, args.samples, args.repeats = 64, 2, 1
    numeric = not (args.no_numeric or args.quick)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    rows = [
        trf_case(args.size, args.repeats, numeric),
        probe_case(args.size, args.samples, args.repeats, numeric),
    ]
    table = Table(title=f"Swin at {args.size} px, four stages (CPU)")
    for col in ("case", "model", "variant", "median s", "repeats s", "ratio"):
        table.add_column(col, justify="right")
    for row in rows:
        med = row["median_s"]
        base = med["fx"] if row["case"] == "trf" else med["probe"]
        for variant, ts in row["times_s"].items():
            table.add_row(
                row["case"],
                row["model"],
                variant,
                f"{med[variant]:.2f}",
                " ".join(f"{t:.2f}" for t in ts),
                f"{med[variant] / base:.2f}",
            )
    console.print(table)
    console.print("ratio: median / median of fx (trf) or of probe (probe)")
    trf_row = rows[0]
    console.print(
        "fx TRFs: " + ", ".join(f"{k} {v}" for k, v in trf_row["fx"].items())
        + (
            "; numeric agrees on the clipped field: "
            + ", ".join(f"{k} {v}" for k, v in trf_row["clipped_agree"].items())
            if trf_row["clipped_agree"]
            else ""
        )
    )  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
