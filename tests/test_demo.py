"""``erf-monitor demo --fast``: both variants train, the alert fires for the small one only."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning.pytorch")
pytest.importorskip("tensorboard")

from rich.console import Console

from erf_monitor.cli import main
from erf_monitor.cli.demo import (
    HEAD,
    MIN_COVERAGE,
    SHIFT,
    brightness_dataset,
    demo_model,
    epoch_plan,
    run_demo,
)


def test_task_is_a_faint_global_shift() -> None:
    ds = brightness_dataset(512, seed=3, size=32)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.stack([ds[i][1] for i in range(len(ds))])
    assert torch.equal(x[7], brightness_dataset(512, seed=3, size=32)[7][0])  # seeded
    assert set(y.tolist()) == {0, 1}
    # the label is the sign of a shift of +-SHIFT on unit noise: the image mean tells it
    # (32x32 pixels: SNR 0.04 * 32 = 1.3), a single pixel hardly does
    means = x.mean((1, 2, 3))
    assert abs(means[y == 1].mean() - SHIFT) < 0.01 and abs(means[y == 0].mean() + SHIFT) < 0.01
    assert ((means > 0).long() == y).float().mean() > 0.8
    assert ((x[:, 0, 16, 16] > 0).long() == y).float().mean() < 0.6


def test_epoch_plan_ends_every_progress_bar_full() -> None:
    for batches in (1, 7, 8, 256):
        for steps in range(1, 3 * batches + 2):
            epochs, per = epoch_plan(steps, batches)
            # the fewest epochs a loader of this length allows, found by counting up
            fewest = next(e for e in range(1, steps + 1) if e * batches >= steps)
            assert epochs == fewest and per <= batches, (steps, batches)
            assert steps <= epochs * per < steps + epochs  # last epoch < epochs batches short
            if steps <= batches:
                assert (epochs, per) == (1, steps)  # the demo's 200 of 256: "200/200"


def test_theoretical_fields_and_initial_erf() -> None:
    import erf_monitor as em

    x = torch.randn(2, 1, 128, 128)
    for variant, size in (("small", 71), ("large", 247)):
        net = demo_model(variant)
        trf = em.theoretical_rf(net, (1, 128, 128), ["head"])["head"]
        assert trf.size == (size, size)
        # residual blocks start as identities: the ERF is the stem's 7x7 field
        assert em.compute_erf(net, x, ["head"])["head"].erf_size == 7
    assert MIN_COVERAGE > 71 * 71 / 128**2  # the small TRF cannot reach the threshold


def test_the_small_variant_is_over_budget_by_design() -> None:
    from erf_monitor.testing import assert_erf

    # No training can meet the demo's threshold with 71 px of TRF: the budget says so.
    small, large = demo_model("small"), demo_model("large")
    with pytest.raises(AssertionError, match=r"the TRF allows at most 30\.8% coverage"):
        assert_erf(small, HEAD, input_size=128, min_coverage=MIN_COVERAGE, samples=2)
    # The large one can grow to it (its TRF covers the input), but starts at the stem's 7 px.
    with pytest.raises(AssertionError, match="ERF size 7 ") as info:
        assert_erf(large, HEAD, input_size=128, min_erf_size=64, samples=2)
    assert "impossible" not in str(info.value)


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
    # the small TRF cannot reach min_coverage: the alert fires at once, not after patience
    assert small.alerts == {head: 0} and small.coverage_warnings
    assert "ERFCoverageWarning" in buf.getvalue()
    # 8 steps are too few for the large ERF to grow past 35%: told once, at the end of training
    assert large.alerts == {head: 8} and len(large.coverage_warnings) == 1
    assert "at the end of training" in large.coverage_warnings[0]
    assert small.results is not None and large.results is not None
    text = buf.getvalue()
    assert "tensorboard --logdir" in text and "--samples_per_plugin images=1000" in text
    assert "Accuracy" in text and "7 → " in text  # first -> last probe
    assert (tmp_path / "erf_report.html").is_file()
    assert len(list(tmp_path.glob("*/version_0/erf/events.out.tfevents*"))) == 2
    # the heatmaps also as PNG files a user can open, next to the event files
    for res in results:
        assert res.png_dir == tmp_path / res.variant / "version_0" / "heatmaps"
        pngs = sorted(res.png_dir.glob("net.head/step_*.png"))
        assert [p.name for p in pngs] == [f"step_{s}.png" for s in sorted(res.history[head])]
        assert str(res.png_dir) in " ".join(text.split())


def test_demo_cli_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["demo", "--fast", "--variant", "large", "--logger", "csv", "--no-report"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "large" in out and "coverage" in out
    # ERF scalars are columns of the CSVLogger's own metrics.csv; heatmaps and maps in erf/.
    log_dir = tmp_path / "large" / "version_0"
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "erf/net.head/coverage" in header and "train/loss" in header
    assert list((log_dir / "erf" / "heatmaps").rglob("step_*.png"))
    assert list((log_dir / "erf" / "erf_maps").glob("step_*.npz"))
    assert main(["demo", "--fast", "--steps", "0", "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_large_variant_erf_grows_centred(tmp_path: Path) -> None:
    """100 steps of the large variant: the head's ERF grows from the stem's 7 px, centred."""
    (large,) = run_demo(
        "large",
        out=tmp_path,
        logger="csv",
        steps=100,
        report=False,
        progress=False,
        console=Console(file=io.StringIO()),
    )
    history = large.history[f"net.{HEAD}"]
    first, last = history[min(history)], history[max(history)]
    assert first["erf_size"] == 7 and last["erf_size"] >= 75, last
    assert last["coverage"] >= MIN_COVERAGE and large.alerts == {}
    assert abs(last["centroid_offset_y"]) < 8 and abs(last["centroid_offset_x"]) < 8
    sizes = [history[s]["erf_size"] for s in sorted(history)]
    assert sizes[len(sizes) // 2] > sizes[0]  # it grows during training, not in one jump
