"""``erf-monitor compare`` end to end: two resnet18, two layers, 16 images, 200 resamples.

Run ``python benchmarks/bench_compare.py`` (issue 17/19's case: ``torchvision:resnet18``
against a resnet18 checkpoint of other weights, layers ``layer3`` and ``layer4``, 16 noise
images of 128 px, 200 bootstrap resamples, BCa); ``--quick`` for a smoke run; ``--before
SRC`` also times another source tree (e.g. an export of an older commit's ``src``), the trees
alternating ``--repeats`` times.

Each run is the real command in a fresh process (``python -m erf_monitor.cli.main compare
...`` with ``PYTHONPATH=SRC``): imports, model building, probes, bootstrap and the figure, as
a user waits for them. Reported per run: wall time, the process's CPU time (user + system:
close to what an idle machine's wall time would be for this mostly single-threaded work), and
the command's own per-part breakdown (the ``Time:`` line of trees that print it). Medians
and the before/after ratio are printed. Timings on a loaded machine are off by large factors;
compare numbers of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
PARTS = re.compile(
    r"models and images ([\d.]+) s, probes ([\d.]+) s, bootstrap ([\d.]+) s, outputs ([\d.]+) s"
)


def make_checkpoint(path: Path) -> None:
    """A resnet18 of other (seeded) weights, saved as a plain state dict."""
    import torch
    import torchvision

    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), path)


def command(ckpt: Path, out: Path, quick: bool) -> list[str]:
    size, samples, boot, layers = ("48", "4", "20", ["layer1"]) if quick else (
        "128", "16", "200", ["layer3", "layer4"])  # fmt: skip
    return [
        sys.executable, "-m", "erf_monitor.cli.main", "compare", "torchvision:resnet18",
        f"torchvision:resnet18@{ckpt}", "--names", "init,other", "--layers", *layers,
        "--input-size", size, "--samples", samples, "--bootstrap", boot, "--out", str(out),
    ]  # fmt: skip


def run_once(src: Path, cmd: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(src), "MPLBACKEND": "Agg", "COLUMNS": "200"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"compare failed ({src}): {proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    record: dict[str, Any] = {"wall_s": wall, "cpu_s": cpu}
    found = PARTS.search(" ".join(proc.stdout.split()))
    if found:
        record["parts_s"] = dict(
            zip(("models and images", "probes", "bootstrap", "outputs"), map(float, found.groups()))
        )
    return record


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs per tree (alternating)")
    ap.add_argument("--before", default=None, metavar="SRC", help="another tree to time")
    ap.add_argument("--quick", action="store_true", help="smoke run: 48 px, 4 images, 1 layer")
    ap.add_argument("--json", help="also write the measurements to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 1

    from rich.console import Console
    from rich.table import Table

    trees = {"after": SRC} if args.before is None else {"before": Path(args.before), "after": SRC}
    info = {"cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_start": os.getloadavg()}  # fmt: skip
    console = Console(width=max(Console().width, 110))
    runs: dict[str, list[dict[str, Any]]] = {tree: [] for tree in trees}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "resnet18_other.pt"
        make_checkpoint(ckpt)
        cmd = command(ckpt, Path(tmp) / "out", args.quick)
        console.print(f"[bold]erf-monitor compare[/] {' '.join(cmd[4:])}\n{info}")
        for _ in range(args.repeats):
            for tree, src in trees.items():
                runs[tree].append(run_once(src, cmd))
    info["load_avg_end"] = os.getloadavg()
    table = Table(title="compare, seconds (medians; all runs)")
    for col in ("tree", "wall", "CPU (user+sys)", "parts (median of runs)", "all walls"):
        table.add_column(col, justify="right")
    med: dict[str, dict[str, float]] = {}
    for tree, rs in runs.items():
        med[tree] = {
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "cpu_s": statistics.median(r["cpu_s"] for r in rs),
        }
        parts = ""
        if all("parts_s" in r for r in rs):
            keys = rs[0]["parts_s"]
            parts = ", ".join(
                f"{k} {statistics.median(r['parts_s'][k] for r in rs):.1f}" for k in keys
            )
        table.add_row(tree, f"{med[tree]['wall_s']:.1f}", f"{med[tree]['cpu_s']:.1f}", parts,
                      " ".join(f"{r['wall_s']:.1f}" for r in rs))  # fmt: skip
    console.print(table)
    if "before" in med:
        for key in ("wall_s", "cpu_s"):
            ratio = med["before"][key] / med["after"][key]
            console.print(f"before / after ({key[:-2]}): [bold]{ratio:.1f}x[/]")
    report = {"machine": info, "args": vars(args), "runs": runs, "medians": med}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
