"""The README's and examples/' code runs as written."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
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
