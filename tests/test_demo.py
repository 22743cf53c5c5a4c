"""``erf-monitor demo --fast``: both variants train, the alert fires for the small one only."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning.pytorch")
pytest.importorskip("tensorboard")

from rich.console import Console

from erf_monitor._demo import HEAD, corner_dataset, demo_model, run_demo
from erf_monitor.cli import main


def test_task_needs_the_corners() -> None:
    x, y = corner_dataset(256, seed=3)
    assert torch.equal(x, corner_dataset(256, seed=3)[0])  # seeded
    assert set(y.tolist()) == {0, 1, 2, 3}
    centre = x[:, 0, 16 - 6 : 16 + 7, 16 - 6 : 16 + 7]  # 13x13 around the centre: noise only
    assert centre.max() < 3.0
    bright = x[:, 0].flatten(1).argmax(1)
    rows, cols = bright // 32, bright % 32
    assert torch.equal((rows >= 16).long() * 2 + (cols >= 16).long(), y)


def test_theoretical_fields() -> None:
    import erf_monitor as em

    for variant, size in (("small", 11), ("large", 49)):
        trf = em.theoretical_rf(demo_model(variant), (1, 32, 32), ["head"])["head"]
        assert trf.size == (size, size)


def test_demo_fast(tmp_path: Path) -> None:
    buf = io.StringIO()
    results = run_demo(
        "both",
        out=tmp_path,
        fast=True,
        progress=False,
        console=Console(file=buf, width=140),
    )
    small, large = results
    head = f"net.{HEAD}"
    assert head in small.alerts and small.coverage_warnings
    assert "ERFCoverageWarning" in buf.getvalue()
    assert large.alerts == {} and large.coverage_warnings == []
    assert small.results is not None and large.results is not None
    assert small.results[head].coverage < 0.15 <= large.results[head].coverage
    text = buf.getvalue()
    assert "tensorboard --logdir" in text and "Accuracy" in text
    assert (tmp_path / "erf_report.html").is_file()
    assert len(list(tmp_path.glob("*/version_0/events.out.tfevents*"))) == 2


def test_demo_cli_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["demo", "--fast", "--variant", "large", "--logger", "csv", "--no-report"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "large" in out and "coverage" in out
    assert (tmp_path / "large" / "version_0" / "erf" / "metrics.csv").is_file()
    assert main(["demo", "--fast", "--steps", "0", "--out", str(tmp_path)]) == 2
