"""The end-of-training summary table reads whole in any console: narrow, wide or not a TTY."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from erf_monitor.monitor.summary import CAPTION, print_summary

LONG = "backbone.layer4.1.conv2"
HISTORY = {
    LONG: {
        0: {"erf_size": 41.0, "erf_trf_ratio": 0.2, "coverage": 0.03, "trf_size_clipped": 211.0},
        500: {"erf_size": 97.0, "erf_trf_ratio": 0.45, "coverage": 0.19, "trf_size_clipped": 211.0},
    },
    "net.stem": {
        0: {"erf_size": 4.0, "erf_trf_ratio": 0.2, "coverage": 0.003, "trf_size_clipped": 7.0},
        500: {"erf_size": 5.0, "erf_trf_ratio": 0.45, "coverage": 0.009, "trf_size_clipped": 7.0},
    },
}
HEADERS = ["layer", "TRF", "ERF", "ERF/TRF", "coverage", "alert"]


def _print(console: Console | None = None) -> str:
    print_summary(HISTORY, {"net.stem": 0}, {LONG: 0.05, "net.stem": 0.35}, console=console)
    assert console is None or isinstance(console.file, io.StringIO)
    return console.file.getvalue() if console is not None else ""


def _header(out: str) -> list[str]:
    return next(line for line in out.splitlines() if "coverage" in line and "layer" in line).split()


@pytest.mark.parametrize("width", [60, 80, 120])
def test_headers_stay_whole_in_a_console_of_any_width(width: int) -> None:
    out = _print(Console(width=width, file=io.StringIO(), color_system=None))
    assert _header(out) == HEADERS, out
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= width  # nothing cropped
    assert "0.20" in out and "0.45" in out and "19.0%" in out and "step 0" in out
    assert "".join(out.split()).count("".join(LONG.split())) <= 1
    flat = "".join(line.split("  ")[1] for line in out.splitlines() if line.startswith("  "))
    assert all(part in flat for part in ("backbone", "conv2"))
    if width >= 120:
        assert f"  {LONG}  " in out  # room enough: the name on one line


def test_not_a_tty_prints_every_row_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    _print()  # its own console on captured stdout: not a terminal, 80 columns by default
    out = capsys.readouterr().out
    assert _header(out) == HEADERS
    rows = [line for line in out.splitlines() if LONG in line or "net.stem" in line]
    assert len(rows) == 2 and LONG in rows[0]
    assert "3.0% → 19.0%" in rows[0] and "none (5%)" in rows[0]
    assert "0.3% → 0.9%" in rows[1] and "step 0 (35%)" in rows[1]
    assert " ".join(CAPTION.split()[:4]) in " ".join(out.split())
