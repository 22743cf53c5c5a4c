"""The command line's usage errors: one short line, the subcommand's usage, a close match
(issue 28)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import HANG_GUARD_S
from erf_monitor.cli.main import main

pytest.importorskip("torchvision")


def _missing_device() -> str:
    """A CUDA device this machine does not have (none at all on CPU-only machines)."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


def test_device_without_cuda_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    dev = _missing_device()
    proc = subprocess.run(
        [sys.executable, "-m", "erf_monitor.cli", "analyze", "torchvision:resnet18",
         "--device", dev, "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=HANG_GUARD_S,  # a hang guard only
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"erf-monitor analyze: error: --device {dev}")
    assert "available here: cpu" in lines[0]
    assert not (tmp_path / "out").exists()  # checked before anything was loaded or written


def test_compare_checks_device_first(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "nonexistent:model", "other:model", "--device", "tpu0"]) == 2
    assert "--device 'tpu0' is not a torch device; available here: cpu" in capsys.readouterr().err


def test_option_typo_suggests_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--input_size", "64", "torchvision:resnet18"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: erf-monitor analyze")  # the subcommand's usage
    assert err.strip().splitlines()[-1] == (
        "erf-monitor analyze: error: unrecognized argument: --input_size "
        "(did you mean --input-size?)"
    )


def test_command_and_choice_typos_suggest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyse", "torchvision:resnet18"]) == 2
    assert "did you mean 'analyze'?" in capsys.readouterr().err
    assert main(["analyze", "torchvision:resnet18", "--mode", "lou"]) == 2
    assert "did you mean 'luo'?" in capsys.readouterr().err


def test_unknown_layer_is_one_short_line_with_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["analyze", "torchvision:resnet18", "--layers", "layer5", "--input-size", "32",
            "--samples", "1", "--out", str(tmp_path), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "erf-monitor analyze: error: unknown layer 'layer5' (did you mean 'layer4', 'layer3', "
        "'layer2'?); list the layers: erf-monitor layers torchvision:resnet18"
    )


def test_layers_command_lists_names_shapes_and_auto(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", "torchvision:resnet18", "--input-size", "64"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    assert "64x32x32" in rows["conv1"] and "yes" not in rows["conv1"]
    assert "512x2x2" in rows["layer4"] and "yes" in rows["layer4"]  # stride 32: 64 -> 2
    assert "layer1.0.conv2" in rows and not any("not run" in r for r in rows.values())


def test_every_command_error_is_a_cli_error() -> None:
    # One error type: main() prints any of them as one line (exit 2) without re-raising them.
    from erf_monitor.cli.batch import BatchError
    from erf_monitor.cli.compare import CompareError
    from erf_monitor.cli.demo import DemoError
    from erf_monitor.cli.errors import CLIError
    from erf_monitor.cli.models import ModelSpecError
    from erf_monitor.cli.replay import ReplayError
    from erf_monitor.cli.report import ReportError

    for cls in (BatchError, CompareError, DemoError, ModelSpecError, ReplayError, ReportError):
        assert issubclass(cls, CLIError), cls
    for cls in (BatchError, CompareError, ModelSpecError, ReplayError):  # as before, too
        assert issubclass(cls, ValueError), cls


def test_report_error_exits_2_with_its_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("erf-monitor report: error: ") and "\n" not in err
