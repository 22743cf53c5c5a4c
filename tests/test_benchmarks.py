"""Every benchmark in benchmarks/ still runs (its ``--quick`` mode) and writes its measurements.

Nothing here is timed: the numbers are for the docs, measured by hand. What is tested is that a
change elsewhere (bench_overhead.py imported a demo dataset that had been renamed) cannot leave
a documented benchmark broken unnoticed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, tmp_path: Path, *args: str) -> Any:
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), "--quick", "--json", str(out), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_overhead(tmp_path: Path) -> None:
    report = run_benchmark("bench_overhead.py", tmp_path)
    assert len(report["times_s"]["with"]) == len(report["times_s"]["without"]) == 1
    assert 0.0 < report["hook_share"][0] < 1.0


@pytest.mark.slow
def test_bench_hf_callback(tmp_path: Path) -> None:
    report = run_benchmark("bench_hf_callback.py", tmp_path)
    assert len(report["times_s"]["with"]) == len(report["times_s"]["without"]) == 1
    assert 0.0 < report["event_share"][0] < 1.0


@pytest.mark.slow
def test_bench_probe(tmp_path: Path) -> None:
    report = run_benchmark("bench_probe.py", tmp_path, "--no-memory", "--no-plain")
    assert report["sizes"]


@pytest.mark.slow
def test_bench_positions(tmp_path: Path) -> None:
    rows = run_benchmark("bench_positions.py", tmp_path)
    assert rows


@pytest.mark.slow
def test_bench_swin(tmp_path: Path) -> None:
    cases = {row["case"]: row for row in run_benchmark("bench_swin.py", tmp_path)}
    assert len(cases["trf"]["times_s"]["fx"]) == len(cases["probe"]["times_s"]["probe"]) == 1
    assert set(cases["trf"]["fx"]) == {"features.1", "features.3", "features.5", "features.7"}


def test_bench_metrics(tmp_path: Path) -> None:
    report = run_benchmark("bench_metrics.py", tmp_path)
    medians = report["medians"]["after"]
    assert {"probe", "metrics", "metrics[openerf]", "train_step"} <= set(medians)
    assert 0.0 < report["ratios"]["after"]["metrics / (maps + metrics)"] < 1.0


@pytest.mark.slow
def test_bench_compare(tmp_path: Path) -> None:
    report = run_benchmark("bench_compare.py", tmp_path)
    (run,) = report["runs"]["after"]
    assert run["wall_s"] > 0 and set(run["parts_s"]) == {
        "models and images", "probes", "bootstrap", "outputs"}  # fmt: skip


@pytest.mark.slow
def test_bench_call(tmp_path: Path) -> None:
    report = run_benchmark("bench_call.py", tmp_path)
    assert set(report["medians"]["after"]) == {"plain", "fresh", "cached"}
    assert report["map_difference"]["after"] < 1e-4  # the probe's map is the plain loop's


@pytest.mark.slow
def test_bench_loop_trace(tmp_path: Path) -> None:
    report = run_benchmark("bench_loop_trace.py", tmp_path)
    (row,) = report["rows"]
    assert row["method"] == "fx" and row["tokens"] == 64
    assert set(row["median_cpu_s"]) == {"forward", "trf", "trf_numeric", "probe"}


def test_bench_lean(tmp_path: Path) -> None:
    rows = run_benchmark("bench_lean.py", tmp_path)
    assert [row["case"] for row in rows] == ["centre", "grid:3", "centre, crop=False"]
    for row in rows:
        assert set(row["median"]["cpu"]) == {"lean", "off"}
        assert row["max_rel_diff"] < 1e-5  # the same maps either way


def test_bench_tensorboard(tmp_path: Path) -> None:
    report = run_benchmark("bench_tensorboard.py", tmp_path, "--png", str(tmp_path))
    (run,) = report["runs"]["after"]
    assert len(run["cpu_s"]) == len(run["wall_s"]) == 3
    assert (tmp_path / "growth_after.png").read_bytes().startswith(b"\x89PNG")
