"""What one ``compute_erf`` call costs beyond its forward and backward work.

Run ``python benchmarks/bench_call.py`` (issue 19's case: torchvision convnext_tiny,
``features.5``, 224 px, 4 images, one torch thread); ``--quick`` for a smoke run;
``--before SRC`` also times another source tree (e.g. an export of an older commit's
``src``) in the same run, for before/after numbers from the same machine.

Every source tree is timed in its own subprocess (``PYTHONPATH=SRC``) on the same seeded
model and images; in each one the variants run once per repeat in a rotating order, and the
trees alternate over ``--rounds``; medians are reported:

* ``plain``: one image at a time, the whole model forward with a hook on the layer, the
  centre unit's channel sum differentiated w.r.t. the image (RepLKNet's
  ``visualize_erf.py`` loop): the forward/backward work alone;
* ``fresh``: ``compute_erf`` on a model it has never seen (a copy made before the clock
  starts): layers resolved, TRFs analysed, then the probe;
* ``cached``: ``compute_erf`` again on the same model (a tree that keeps its plans reuses
  them; one that does not pays the analysis again).

Printed: the medians and ``plain / fresh`` and ``plain / cached`` (above 1: faster than the
plain loop). Timings on a loaded machine are off by large factors; compare ratios of one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from _timing import interleaved

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def _worker(model_name: str, layer: str, size: int, samples: int, repeats: int) -> dict[str, Any]:
    """Runs in a subprocess with the source tree under test first on the path."""
    import torch
    import torchvision

    import erf_monitor as em

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)().eval()
    x = torch.randn(samples, 3, size, size, generator=torch.Generator().manual_seed(1))
    module = dict(model.named_modules())[layer]

    def plain() -> torch.Tensor:
        total = torch.zeros(size, size)
        seen: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            for i in range(samples):
                xi = x[i : i + 1].clone().requires_grad_(True)
                seen.clear()
                model(xi)
                y = seen[0]
                unit = y[:, :, y.shape[2] // 2, y.shape[3] // 2].sum()
                (g,) = torch.autograd.grad(unit, xi)
                total += g.abs().sum(1)[0]
        finally:
            handle.remove()
        return total / samples

    copies = [copy.deepcopy(model) for _ in range(repeats + 1)]
    cached_model = copy.deepcopy(model)
    em.compute_erf(cached_model, x, [layer])  # (a tree with a plan cache keeps this one)

    def fresh() -> torch.Tensor:
        return em.compute_erf(copies.pop(), x, [layer])[layer].heatmap

    def cached() -> torch.Tensor:
        return em.compute_erf(cached_model, x, [layer])[layer].heatmap

    variants = {"plain": plain, "fresh": fresh, "cached": cached}
    fresh()  # warm-up (imports, allocator)
    plain()
    times = interleaved(variants, repeats)
    ref, got = plain(), cached()
    diff = float((ref - got).abs().max() / ref.abs().max())
    return {"times_s": times, "map_difference": diff}


def _run_tree(src: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, __file__, "--worker", args.model, args.layer, str(args.size),
        str(args.samples), str(args.repeats),
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="convnext_tiny")
    ap.add_argument("--layer", default="features.5")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="alternations of the source trees")
    ap.add_argument("--before", type=Path, help="another source tree to time the same way")
    ap.add_argument("--quick", action="store_true", help="a smoke run (small and short)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        model, layer, size, samples, repeats = args.worker
        print(json.dumps(_worker(model, layer, int(size), int(samples), int(repeats))))
        return {}
    if args.quick:
        args.model, args.layer, args.size, args.samples, args.repeats = (
            "resnet18", "layer3", 64, 2, 1)  # fmt: skip
    trees = {"after": SRC, **({"before": args.before} if args.before else {})}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
    for _ in range(args.rounds):
        for name, src in trees.items():
            runs[name].append(_run_tree(src, args))
    report: dict[str, Any] = {
        "case": f"{args.model} {args.layer} {args.size} px, {args.samples} images, 1 thread",
        "load_avg": os.getloadavg(),
        "medians": {},
        "ratios": {},
        "map_difference": {},
    }
    for name, tree_runs in runs.items():
        med = {
            v: statistics.median(t for run in tree_runs for t in run["times_s"][v])
            for v in ("plain", "fresh", "cached")
        }
        report["medians"][name] = med
        report["ratios"][name] = {
            "plain / fresh": med["plain"] / med["fresh"],
            "plain / cached": med["plain"] / med["cached"],
        }
        report["map_difference"][name] = max(run["map_difference"] for run in tree_runs)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
