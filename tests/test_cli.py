"""``erf-monitor analyze`` and the MODEL spec loader, through ``main()`` and the console script."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import erf_monitor as em
from conftest import HANG_GUARD_S
from erf_monitor.cli import main
from erf_monitor.core.imports import package_available

torchvision = pytest.importorskip("torchvision")

SCRIPT = Path(sys.executable).parent / "erf-monitor"


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_analyze_resnet18_matches_compute_erf(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["analyze", "torchvision:resnet18", "--input-size", "64", "--samples", "2"]
    rc = main([*args, "--layers", "layer*", "--out", str(out), "--quiet"])
    assert rc == 0
    layers = ["layer1", "layer2", "layer3", "layer4"]
    for name in layers:
        assert (out / "heatmaps" / f"{name}.png").stat().st_size > 0
    assert (out / "erf_overview.png").is_file()

    # The same numbers, derived independently: seed 0 for the init and for the noise.
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ref = em.compute_erf(model, x, layers=layers)

    record = json.loads((out / "metrics.json").read_text())
    assert record["input_shape"] == [2, 3, 64, 64]
    assert list(record["layers"]) == layers
    with np.load(out / "maps.npz", allow_pickle=False) as maps:
        assert sorted(maps.files) == sorted([*layers, "__mode__", "__definition__"])
        for name in layers:
            np.testing.assert_allclose(maps[name], ref[name].heatmap.numpy(), rtol=1e-6, atol=0)
    for name in layers:
        expected = ref[name].scalars()
        got = record["layers"][name]["metrics"]
        assert set(got) == set(expected)
        for key, value in expected.items():
            if np.isfinite(value):
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key)
            else:
                assert got[key] is None
        assert record["layers"][name]["output_shape"] == list(ref[name].output_shape)


def test_analyze_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "analyze",
            "torchvision:resnet18",
            "--input-size",
            "48x40",
            "--samples",
            "1",
            "--layers",
            "layer1,layer2",
            "--mode",
            "replknet",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "layer1" in out and "layer2" in out and "coverage" in out
    assert json.loads((tmp_path / "metrics.json").read_text())["mode"] == "replknet"


@pytest.mark.skipif(not SCRIPT.exists(), reason="console script not installed (pip install -e .)")
def test_console_script(tmp_path: Path) -> None:
    args = ["analyze", "torchvision:resnet18", "--input-size", "32", "--samples", "1"]
    proc = subprocess.run(
        [str(SCRIPT), *args, "--layers", "layer1", "--out", str(tmp_path), "--quiet"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert proc.returncode == 0, proc.stderr
    assert "layer1" in proc.stdout
    assert (tmp_path / "metrics.json").is_file()
    bad = subprocess.run(
        [str(SCRIPT), "analyze", "torchvision:resnet_18"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert bad.returncode == 2
    assert "resnet18" in _one_error_line(bad.stderr)


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("torchvision:resnet19", ["no model 'resnet19'", "resnet18"]),
        ("torchvision:ResNet50", ["resnet50"]),
        ("keras:resnet50", ["unknown model source 'keras'", "torchvision:<name>"]),
        ("resnet50", ["torchvision:<name>"]),
        ("does/not/exist.py:make", ["does not exist"]),
    ],
)
def test_bad_specs(spec: str, needles: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", spec, "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    for needle in needles:
        assert needle in line


def test_timm_missing(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import erf_monitor.cli.models as models

    monkeypatch.setattr(models, "package_available", lambda name: name != "timm")
    assert main(["analyze", "timm:resnet18", "--quiet"]) == 2
    assert "pip install timm" in _one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(not package_available("timm"), reason="timm is not installed")
def test_timm_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "timm:resnet_18", "--quiet"]) == 2
    assert "resnet18" in _one_error_line(capsys.readouterr().err)


MODEL_FILE = """
import torch

def make():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1)
    )

def not_a_model():
    return 42
"""


def test_file_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent(MODEL_FILE))
    out = tmp_path / "out"
    common = ["--input-size", "16", "--channels", "1", "--samples", "2", "--quiet"]
    assert main(["analyze", f"{path}:make", *common, "--layers", "0", "2", "--out", str(out)]) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["layers"]["2"]["trf"]["size"] == [5.0, 5.0]
    assert record["layers"]["2"]["metrics"]["erf_size"] <= 5
    capsys.readouterr()

    assert main(["analyze", f"{path}:mkae", *common]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "no 'mkae'" in line and "make" in line
    assert main(["analyze", f"{path}:not_a_model", *common]) == 2
    assert "not a torch.nn.Module" in _one_error_line(capsys.readouterr().err)
    assert main(["analyze", f"{path}:make", *common, "--layers", "conv9"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "conv9" in line and "0, 1, 2" in line


def test_npy_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    out = tmp_path / "out"
    args = ["analyze", "torchvision:resnet18", "--layers", "layer1", "--samples", "2", "--quiet"]
    assert main([*args, "--input", str(tmp_path / "x.npy"), "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["input_shape"] == [2, 3, 32, 32]
    capsys.readouterr()

    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main([*args, "--input", str(tmp_path / "obj.npy"), "--out", str(out)]) == 2
    assert "plain .npy" in _one_error_line(capsys.readouterr().err)


def test_help_says_file_specs_run_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--help"]) == 0
    text = capsys.readouterr().out
    assert "RUNS THE CODE IN THAT FILE" in text
    assert main([]) == 2
