"""A Python loop over tokens: the TRF analysis against a forward of the same model.

Run ``python benchmarks/bench_loop_trace.py`` (``--quick`` for a smoke run, ``--json PATH`` to
write the numbers). The model is a 4 px patch convolution, a Mamba-style selective scan
written as a Python loop over the ``L = (S / 4)^2`` tokens (``h = dA_i * h + dBu_i``,
``y_i = (h * C_i).sum(-1)``), and a 3 x 3 convolution; the fx trace unrolls the loop (one
graph node per op per token) unless the trace stops at the loop: the default method stops
once one op at one module has been recorded ``LOOP_BOUND`` (64) times plus once per module
inside it, and leaves the layers after it without a TRF (one warning says why). Variants,
interleaved in a rotating order after one untimed warm-up each:

* ``forward``: the model on the probe batch (2 images), no gradients;
* ``trf``: ``theoretical_rf`` of the scan and the last convolution (the default method); a
  fresh copy of the model each call (plans are cached per model);
* ``trf_numeric``: the same with ``method="numeric"`` (a float64 surrogate, forward and
  backward of 12 samples through the loop);
* ``probe``: ``compute_erf`` of both layers on the 2 images, TRF analysis included (fresh
  copy too).

Each row also says which method gave the TRFs that the default analysis returned for the
three layers and which of them it left unknown. The script only calls the public API: run it
with ``PYTHONPATH`` at an older checkout's ``src`` for that code's numbers (the "before" of
docs/benchmarks.md). Wall time and the process's CPU time are both reported (medians): the
machine is shared, so CPU time is the steadier of the two.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import erf_monitor as em


class Scan(nn.Module):
    """A Mamba-style selective scan over the tokens of a map, written as a Python loop."""

    def __init__(self, d: int, s: int = 4) -> None:
        super().__init__()
        self.dt = nn.Linear(d, d)
        self.B = nn.Linear(d, s)
        self.C = nn.Linear(d, s)
        self.A = nn.Parameter(-torch.rand(d, s))
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d, h, w = x.shape
        u = x.flatten(2).transpose(1, 2)  # (N, L, D)
        dt = nn.functional.softplus(self.dt(u))
        da = torch.exp(dt.unsqueeze(-1) * self.A)  # (N, L, D, S)
        dbu = dt.unsqueeze(-1) * self.B(u).unsqueeze(2) * u.unsqueeze(-1)
        c = self.C(u)  # (N, L, S)
        state = torch.zeros_like(da[:, 0])
        ys = []
        for i in range(u.shape[1]):
            state = da[:, i] * state + dbu[:, i]
            ys.append((state * c[:, i].unsqueeze(1)).sum(-1))
        y = self.out(torch.stack(ys, 1))
        return y.transpose(1, 2).reshape(n, d, h, w)


def scan_model(width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 4, stride=4), Scan(width), nn.Conv2d(width, width, 3, padding=1)
    ).eval()


def case(size: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = scan_model()
    x = torch.randn(2, 3, size, size)
    layers = ["1", "2"]
    pool = [copy.deepcopy(model) for _ in range(3 * repeats + 6)]

    def forward() -> Any:
        with torch.no_grad():
            return model(x)

    def trf() -> Any:
        return em.theoretical_rf(pool.pop(), (3, size, size), layers)

    def trf_numeric() -> Any:
        return em.theoretical_rf(pool.pop(), (3, size, size), layers, method="numeric")

    def probe() -> Any:
        return em.compute_erf(pool.pop(), x, layers)

    variants: dict[str, Callable[[], Any]] = {
        "forward": forward, "trf": trf, "trf_numeric": trf_numeric, "probe": probe,
    }  # fmt: skip
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loop's note, estimated centres
        for fn in variants.values():
            fn()
        names = list(variants)
        for r in range(repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                w0, c0 = time.perf_counter(), time.process_time()
                variants[name]()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
        every = ["0", *layers]
        found = em.theoretical_rf(copy.deepcopy(model), (3, size, size), every)
    med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in variants}
    return {
        "size": size,
        "tokens": (size // 4) ** 2,
        "method": "/".join(sorted({t.method for t in found.values()})),
        "unknown": [name for name in every if name not in found],
        "wall_s": wall,
        "cpu_s": cpu,
        "median_wall_s": {k: v[0] for k, v in med.items()},
        "median_cpu_s": {k: v[1] for k, v in med.items()},
        "trf_over_forward_cpu": med["trf"][1] / med["forward"][1],
        "numeric_over_forward_cpu": med["trf_numeric"][1] / med["forward"][1],
        "probe_over_forward_cpu": med["probe"][1] / med["forward"][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small size, one repeat")
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 128, 224])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes, repeats = ([32], 1) if args.quick else (args.sizes, args.repeats)
    torch.set_num_threads(1)
    rows = [case(s, repeats) for s in sizes]
    print(f"{platform.machine()} CPU, 1 thread, torch {torch.__version__}")
    kinds = ("forward", "trf", "trf_numeric", "probe")
    print(f"size  tokens  TRF method  unknown  {'  '.join(f'{k} (wall / cpu)' for k in kinds)}")
    for r in rows:
        w, c = r["median_wall_s"], r["median_cpu_s"]
        cells = "  ".join(f"{w[k]:.3f} / {c[k]:.3f} s" for k in kinds)
        unknown = ",".join(r["unknown"]) or "-"
        print(f"{r['size']:4d}  {r['tokens']:6d}  {r['method']:10s}  {unknown:7s}  {cells}")
        ratios = ("trf", "numeric", "probe")
        print("      CPU time / forward: " + ", ".join(
            f"{k} {r[f'{k}_over_forward_cpu']:.1f}" for k in ratios
        ))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
