"""What the TensorBoard sink costs per probe, growth chart (``erf/0_growth``) included.

Run ``python benchmarks/bench_tensorboard.py`` (issue 25's case: 20 probes of 4 layers, each
logging coverage, ERF size and ERF/TRF ratio, two of them with a ``min_coverage``);
``--before SRC`` also times another source tree (e.g. an export of an older commit's ``src``)
on the same values, for before/after numbers from the same machine and run; ``--png DIR``
writes each tree's last growth chart, read back from its event file, to look at.

Every source tree runs in its own subprocess (``PYTHONPATH=SRC``), ``--rounds`` times,
alternating. Timed: ``TensorBoardSink.log_scalars`` of each probe, CPU (process time) and
wall; the first probe (imports, fonts) is reported on its own, the others as per-probe
medians. Timings on a loaded machine are off by large factors: compare the CPU times, and
trees of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _scalars(probe: int) -> dict[str, float]:
    """One probe's scalars: slowly growing coverage, deterministic."""
    out: dict[str, float] = {}
    for i, layer in enumerate(LAYERS):
        wobble = 0.01 * ((probe * 7 + i * 3) % 5) / 4
        out[f"erf/{layer}/coverage"] = min(1.0, 0.1 * (i + 1) + 0.012 * probe + wobble)
        out[f"erf/{layer}/erf_size"] = 10.0 * (i + 1) + probe
        out[f"erf/{layer}/erf_trf_ratio"] = 0.3 + 0.01 * probe
        if i % 2 == 0:
            out[f"erf/{layer}/min_coverage"] = 0.2 * (i + 1)
    return out


# ----------------------------------------------------------------------------- worker


def _worker(probes: int, png: str) -> dict[str, Any]:
    """Runs in a subprocess with the source tree under test first on the path."""
    from erf_monitor.sinks import TensorBoardSink

    cpu: list[float] = []
    wall: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        sink = TensorBoardSink(tmp)
        for probe in range(probes):
            values = _scalars(probe)
            c0, w0 = time.process_time(), time.perf_counter()
            sink.log_scalars(values, probe * 100)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        sink.close()
        if png:
            _save_last_chart(tmp, png)
    return {"cpu_s": cpu, "wall_s": wall}


def _save_last_chart(logdir: str, png: str) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(logdir, size_guidance={"images": 0})
    ea.Reload()
    Path(png).write_bytes(ea.Images("erf/0_growth")[-1].encoded_image_string)


# ----------------------------------------------------------------------------- parent


def run_tree(src: Path, probes: int, png: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(src), "MPLBACKEND": "Agg"}
    cmd = [sys.executable, __file__, "--worker", str(probes), png]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--probes", type=int, default=20, help="probes logged per run")
    ap.add_argument("--rounds", type=int, default=3, help="runs per tree (alternating)")
    ap.add_argument("--before", default=None, metavar="SRC", help="another tree to time")
    ap.add_argument("--png", default=None, metavar="DIR", help="write the last growth charts")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 probes, 1 round")
    ap.add_argument("--json", help="also write the measurements to this JSON file")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(int(args.worker[0]), args.worker[1])))
        return {}
    if args.quick:
        args.probes, args.rounds = 3, 1

    trees = {"after": SRC} if args.before is None else {"before": Path(args.before), "after": SRC}
    info = {"cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_start": os.getloadavg()}  # fmt: skip
    print(f"TensorBoardSink.log_scalars: {args.probes} probes of {len(LAYERS)} layers, "
          f"{args.rounds} round(s); {info}")  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {tree: [] for tree in trees}
    for _ in range(args.rounds):
        for tree, src in trees.items():
            png = str(Path(args.png) / f"growth_{tree}.png") if args.png else ""
            if png:
                Path(args.png).mkdir(parents=True, exist_ok=True)
            runs[tree].append(run_tree(src, args.probes, png))
    info["load_avg_end"] = os.getloadavg()
    summary: dict[str, dict[str, float]] = {}
    print(f"{'tree':>6} {'first cpu s':>12} {'first wall s':>13} {'cpu s/probe':>12} "
          f"{'wall s/probe':>13}   (later probes: medians over every round)")  # fmt: skip
    for tree, rs in runs.items():
        later_cpu = [c for r in rs for c in r["cpu_s"][1:]]
        later_wall = [w for r in rs for w in r["wall_s"][1:]]
        summary[tree] = {
            "first_cpu_s": statistics.median(r["cpu_s"][0] for r in rs),
            "first_wall_s": statistics.median(r["wall_s"][0] for r in rs),
            "cpu_s_per_probe": statistics.median(later_cpu) if later_cpu else float("nan"),
            "wall_s_per_probe": statistics.median(later_wall) if later_wall else float("nan"),
        }
        s = summary[tree]
        print(f"{tree:>6} {s['first_cpu_s']:12.3f} {s['first_wall_s']:13.3f} "
              f"{s['cpu_s_per_probe']:12.4f} {s['wall_s_per_probe']:13.4f}")  # fmt: skip
    if "before" in summary:
        for what in ("cpu_s_per_probe", "wall_s_per_probe"):
            ratio = summary["before"][what] / summary["after"][what]
            print(f"{what}: before / after = {ratio:.1f}x")
    report = {"machine": info, "args": vars(args), "runs": runs, "summary": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
