"""The demo end to end (fast mode) and the HTML report built from real logs."""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import pytest

from erf_monitor._demo import run_demo
from erf_monitor._report import build_report
from erf_monitor.cli import main
from erf_monitor.sinks import FileSink


@pytest.mark.slow
def test_demo_fast_alert_fires_for_small_rf_only(tmp_path: Path) -> None:
    results = run_demo("both", out=tmp_path / "logs", logger="csv", fast=True, progress=False)
    by_variant = {r.variant: r for r in results}
    assert set(by_variant) == {"small", "large"}
    assert by_variant["small"].alerts, "the small-RF variant must trigger the coverage alert"
    assert not by_variant["large"].alerts, "the dilated/strided variant must not"
    report = tmp_path / "logs" / "erf_report.html"
    assert report.exists() and "data:image/png;base64," in report.read_text()


def test_report_from_file_sink_escapes_names(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "run")
    layer = "blk<script>"
    rng = np.random.default_rng(0)
    for step in (0, 10, 20):
        sink.log_scalars(
            {f"erf/{layer}/erf_size": 5.0 + step, f"erf/{layer}/coverage": 0.1 + step / 100},
            step,
        )
        heat = rng.random((16, 16)).astype(np.float32)
        sink.log_arrays("erf", {layer: heat}, step)
    sink.close()
    out, runs = build_report(tmp_path)
    text = out.read_text()
    assert len(runs) == 1
    assert "<script>" not in text and html.escape(layer) in text
    assert len(re.findall(r"<img src=\"data:image/png;base64,", text)) >= 2


def test_report_cli_errors_on_empty_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "no ERF data" in capsys.readouterr().err


class _Payload:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_report_reads_npz_as_data_never_unpickles(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "maps").mkdir(parents=True)
    marker = tmp_path / "pwned"
    np.savez(run / "maps" / "step_0.npz", evil=np.array([_Payload(marker)], dtype=object))
    FileSink(run).log_scalars({"erf/a/erf_size": 3.0}, 0)
    out, _ = build_report(tmp_path)  # the malicious map is skipped, the rest is reported
    assert out.exists()
    assert not marker.exists(), "the report unpickled a file it read back"
