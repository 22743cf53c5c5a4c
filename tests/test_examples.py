"""The README's and examples/' code runs as written."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "MPLBACKEND": "Agg"}
    env["OMP_NUM_THREADS"] = "1"  # one thread per process: 2 pytest workers share 2 cores
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_lightning_example(tmp_path: Path) -> None:
    out = run_example("lightning_example.py", tmp_path, "--out", "tb", "--steps", "12")
    assert "backbone.7: ERF" in out
    assert glob.glob(str(tmp_path / "tb" / "cnn" / "version_0" / "events.out.tfevents.*"))


@pytest.mark.slow
def test_plain_pytorch_example(tmp_path: Path) -> None:
    out = run_example("plain_pytorch_example.py", tmp_path, "--out", "tb", "--steps", "12")
    assert "layer 5: ERF" in out
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))


@pytest.mark.slow
def test_wandb_example(tmp_path: Path) -> None:
    out = run_example("wandb_example.py", tmp_path, "--save-dir", "wb", "--steps", "12")
    assert "watched layers:" in out
    media = tmp_path / "wb" / "wandb" / "offline-run-*" / "files" / "media" / "images"
    pngs = glob.glob(str(media / "**" / "*.png"), recursive=True)
    assert pngs, "W&B offline run has no heatmap images"


@pytest.mark.slow
def test_transformers_example(tmp_path: Path) -> None:
    out = run_example("transformers_example.py", tmp_path, "--out", "hf", "--steps", "12")
    assert "convnext.encoder.stages.2.layers.0.dwconv: ERF" in out
    assert "(steps [0, 10, 12])" in out
    assert len(glob.glob(str(tmp_path / "hf" / "runs" / "*" / "events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_accelerate_example(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run_example("accelerate_example.py", tmp_path, "--out", "acc", "--steps", "12")
    assert "layer 5: ERF" in out
    assert glob.glob(str(tmp_path / "acc" / "erf" / "events.out.tfevents.*"))
    loss = EventAccumulator(str(tmp_path / "acc" / "erf"), size_guidance={"scalars": 0})
    loss.Reload()  # the tracker's run: the loss once per optimizer step (2 micro-batches each)
    assert [e.step for e in loss.Scalars("train/loss")] == list(range(1, 13))
    assert glob.glob(str(tmp_path / "acc" / "erf" / "erf" / "events.out.tfevents.*"))  # ERF's


@pytest.mark.slow
def test_fabric_example(tmp_path: Path) -> None:
    out = run_example("fabric_example.py", tmp_path, "--out", "fab", "--steps", "12")
    assert "layer 5: ERF" in out
    assert glob.glob(str(tmp_path / "fab" / "cnn" / "version_0" / "events.out.tfevents.*"))


@pytest.mark.slow
def test_mlflow_example(tmp_path: Path) -> None:
    out = run_example("mlflow_example.py", tmp_path, "--out", "ml", "--steps", "12")
    assert "backbone.7: coverage 0: " in out and ", 10: " in out and ", 12: " in out
    assert "erf_maps" in out
    assert "train/loss: 12 values" in out  # one per step, not none (log_every_n_steps=50)


@pytest.mark.slow
def test_fsdp2_example(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "examples" / "fsdp2_example.py"), "--out", "fsdp", "--steps", "6"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("layer 2.0: ERF") == 1  # printed by rank 0 only
    assert "(probed at steps [0, 5, 6])" in proc.stdout
    assert (tmp_path / "fsdp" / "metrics.csv").exists()


@pytest.mark.slow
def test_replay_example(tmp_path: Path) -> None:
    out = run_example("replay_example.py", tmp_path, "--out", "rp", "--steps", "8")
    assert "layer head: ERF size (px) by step 2: " in out and ", 8: " in out
    assert (tmp_path / "rp" / "erf" / "erf_report.html").is_file()
    assert sorted(p.name for p in (tmp_path / "rp" / "erf" / "heatmaps" / "head").iterdir()) == [
        f"step_{s}.png" for s in (2, 4, 6, 8)
    ]
