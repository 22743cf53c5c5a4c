"""What measuring the maps costs, against computing them and against a training step.

Run ``python benchmarks/bench_metrics.py`` (issue 19's case: the demo CNN, 3 layers, 8 images
of 1024 x 1024 px); ``--quick`` for a smoke run; ``--before SRC`` also times another source
tree (e.g. an export of an older commit's ``src``) on the same case, for before/after numbers
from the same machine and run.

Every source tree is timed in its own subprocess (``PYTHONPATH=SRC``) on the same seeded
model and images; in each one every variant runs once per repeat, in a rotating order
(medians reported), and the trees alternate when ``--rounds`` > 1:

* ``probe``: ``compute_erf`` of the layers (maps only; TRFs precomputed once, as the monitor
  caches them);
* ``metrics``: ``scalars()`` of every layer's result, all metrics (fresh results: nothing
  cached from an earlier repeat);
* ``metrics[<group>]`` (trees that have ``scalars(names)``): one group of metrics at a time;
* ``metrics[monitor]`` (trees whose monitor measures only what it logs): what ``ERFMonitor``
  and ``watch`` measure per probe with default options (the logged default metrics and the
  groups the history keeps);
* ``train_step``: one training step on the same images (forward in train mode,
  cross-entropy, ``backward()``, an SGD step).

Printed: medians, and the ratios of the issue's targets: metrics over the probe's wall time
(maps + metrics; target < 10%), probe (maps + metrics) over a training step (target < 2).
Timings on a loaded machine are off by large factors; compare ratios of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _timing import interleaved

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
LAYERS = ("stem", "blocks.1", "head")
GROUPS = ("trf", "extent", "moments", "openerf", "shape")


# ----------------------------------------------------------------------------- worker


def _worker(size: int, samples: int, repeats: int) -> dict[str, Any]:
    """Runs in a subprocess with the source tree under test first on the path."""
    import torch
    from torch import nn

    import erf_monitor as em
    from erf_monitor.cli.demo import demo_model

    torch.manual_seed(0)
    model = demo_model("large")
    with torch.no_grad():  # every block active (the demo zeroes conv2 at initialisation)
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.eval()
    x = torch.randn(samples, 1, size, size)
    labels = torch.randint(0, 2, (samples,))
    trfs = em.theoretical_rf(model, (1, size, size), list(LAYERS))
    trainee = demo_model("large")
    trainee.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(trainee.parameters(), lr=1e-3)

    results = em.compute_erf(model, x, list(LAYERS), trf=trfs)
    selective = _has_selection(results[LAYERS[0]])

    def probe() -> None:
        em.compute_erf(model, x, list(LAYERS), trf=trfs)

    def metrics(names: Sequence[str] | None = None) -> Callable[[], None]:
        def run() -> None:
            for r in results.values():
                fresh = r.with_heatmap(r.heatmap)  # no cached metric
                fresh.scalars() if names is None else fresh.scalars(names)

        return run

    def train_step() -> None:
        trainee.train()
        loss = nn.functional.cross_entropy(trainee(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    variants: dict[str, Callable[[], None]] = {"probe": probe, "metrics": metrics()}
    if selective:
        variants.update({f"metrics[{g}]": metrics([g]) for g in GROUPS})
        monitor_names = _monitor_names()
        if monitor_names is not None:
            variants["metrics[monitor]"] = metrics(monitor_names)
    variants["train_step"] = train_step
    times = interleaved(variants, repeats, warmup=True)
    return {"times": times, "torch_threads": torch.get_num_threads()}


def _monitor_names() -> list[str] | None:
    """What the monitor asks ``scalars`` for per probe by default (``None``: a tree without it)."""
    try:
        from erf_monitor.monitor.engine import HISTORY_GROUPS
        from erf_monitor.sinks._metrics import metric_patterns
    except ImportError:
        return None
    return [*HISTORY_GROUPS, *(metric_patterns(None) or [])]


def _has_selection(result: Any) -> bool:
    try:
        result.scalars(["coverage"])
    except TypeError:  # an older tree: scalars() takes no selection
        return False
    return True


# ----------------------------------------------------------------------------- parent


def run_tree(src: Path, size: int, samples: int, repeats: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(src), "MPLBACKEND": "Agg"}
    cmd = [sys.executable, __file__, "--worker", str(size), str(samples), str(repeats)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size", type=int, default=1024, help="image side, pixels")
    ap.add_argument("--samples", type=int, default=8, help="probe images")
    ap.add_argument("--repeats", type=int, default=5, help="repeats per round and tree")
    ap.add_argument("--rounds", type=int, default=1, help="alternations of the trees")
    ap.add_argument("--before", default=None, metavar="SRC", help="another tree to time")
    ap.add_argument("--quick", action="store_true", help="smoke run: 128 px, 2 images")
    ap.add_argument("--json", help="also write the measurements to this JSON file")
    ap.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(*args.worker)))
        return {}
    if args.quick:
        args.size, args.samples, args.repeats, args.rounds = 128, 2, 1, 1

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    trees = {"after": SRC} if args.before is None else {"before": Path(args.before), "after": SRC}
    info = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_start": os.getloadavg(),
    }
    console = Console(width=max(Console().width, 110))
    console.print(
        f"[bold]metrics cost[/]: demo CNN, layers {list(LAYERS)}, {args.samples} images of "
        f"{args.size} px, {args.repeats} repeats x {args.rounds} round(s); {info}"
    )
    times: dict[str, dict[str, list[float]]] = {tree: {} for tree in trees}
    for _ in range(args.rounds):
        for tree, src in trees.items():
            got = run_tree(src, args.size, args.samples, args.repeats)
            for name, ts in got["times"].items():
                times[tree].setdefault(name, []).extend(ts)
    info["load_avg_end"] = os.getloadavg()
    med = {tree: {k: statistics.median(v) for k, v in t.items()} for tree, t in times.items()}

    table = Table(title="Medians, seconds (all layers together)")
    for col in ("tree", "variant", "median s", "all s"):
        table.add_column(col, justify="right")
    for tree, t in times.items():
        for name, ts in t.items():
            all_s = " ".join(f"{v:.2f}" for v in ts)
            table.add_row(tree, escape(name), f"{med[tree][name]:.3f}", all_s)
    console.print(table)
    ratios: dict[str, dict[str, float]] = {}
    rtable = Table(title="Ratios (medians of the same run)")
    for col in ("tree", "ratio", "value", "target"):
        rtable.add_column(col, justify="right")
    for tree, m in med.items():
        probe_total = m["probe"] + m["metrics"]
        ratios[tree] = {
            "metrics / (maps + metrics)": m["metrics"] / probe_total,
            "(maps + metrics) / train_step": probe_total / m["train_step"],
        }
        targets = ["< 0.10", "< 2"]
        if "metrics[monitor]" in m:
            monitor = m["metrics[monitor]"]
            ratios[tree]["monitor's metrics / (maps + them)"] = monitor / (m["probe"] + monitor)
            targets.append("< 0.10")
        for (name, value), target in zip(ratios[tree].items(), targets):
            rtable.add_row(tree, name, f"{value:.3f}", target)
    if "before" in med:
        speedup = med["before"]["metrics"] / med["after"]["metrics"]
        rtable.add_row("", "metrics before / after", f"{speedup:.1f}x", "")
    console.print(rtable)
    report = {"machine": info, "args": vars(args), "times": times, "medians": med,
              "ratios": ratios}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
