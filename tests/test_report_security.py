"""The HTML report treats what it reads back as data: it never unpickles a map, and it never
reads anything outside the folder it reports on."""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from erf_monitor.cli.report import build_report
from erf_monitor.sinks import FileSink


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


_AUDIT: list[list[str]] = []


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _AUDIT and event in ("open", "os.listdir", "os.scandir") and args:
        path = args[0]
        if isinstance(path, (str, bytes, Path)):
            _AUDIT[-1].append(os.path.realpath(os.fsdecode(path)))


def test_report_never_reads_outside_its_folder(tmp_path: Path) -> None:
    """Symbolic links out of the folder (files, directories, event files, analyze JSON) are
    neither read nor listed, and nothing from outside ends up in the page."""
    pytest.importorskip("tensorboard")
    from erf_monitor.sinks import TensorBoardSink

    outside = tmp_path / "outside"
    _file_run(outside / "secret_run", marker=7.0)  # a complete FileSink run, outside
    secret_png = outside / "secret.png"
    secret_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"SECRET-BYTES" * 20)
    np.savez(outside / "secret.npz", head=np.full((8, 8), 3.0))
    (outside / "metrics.json").write_text('{"layers": {"head": {"metrics": {"erf_size": 99}}}}')
    TensorBoardSink(outside / "tb").log_scalars({"erf/head/erf_size": 77.0}, 1)
    (outside_events,) = (outside / "tb").glob("events*")

    root = tmp_path / "logs"
    _file_run(root / "run", marker=5.0)  # the one legitimate run
    (root / "run" / "heatmaps" / "head").mkdir(parents=True)
    (root / "run" / "heatmaps" / "head" / "step_0.png").symlink_to(secret_png)
    (root / "run" / "maps").mkdir()
    (root / "run" / "maps" / "step_0.npz").symlink_to(outside / "secret.npz")
    (root / "run" / "alerts.jsonl").symlink_to(outside / "secret_run" / "metrics.csv")
    (root / "linked_dir").symlink_to(outside / "secret_run", target_is_directory=True)
    (root / "linked_csv").mkdir()
    (root / "linked_csv" / "metrics.csv").symlink_to(outside / "secret_run" / "metrics.csv")
    (root / "tb").mkdir()
    (root / "tb" / outside_events.name).symlink_to(outside_events)
    (root / "analyzed").mkdir()
    (root / "analyzed" / "metrics.json").symlink_to(outside / "metrics.json")
    (root / "analyzed" / "maps.npz").symlink_to(outside / "secret.npz")

    sys.addaudithook(_audit)  # audit hooks cannot be removed: active only while listed
    _AUDIT.append([])
    try:
        out, runs = build_report(root, tmp_path / "report.html")
    finally:
        touched = _AUDIT.pop()
    assert [(r.name, r.source) for r in runs] == [("run", "files")]
    assert runs[0].frames == {}  # the PNG and the npz behind the links were not used
    real_outside = os.path.realpath(outside)
    leaked = [p for p in touched if p == real_outside or p.startswith(real_outside + os.sep)]
    assert leaked == [], leaked
    page = out.read_text()
    assert base64.b64encode(b"SECRET-BYTES" * 3)[:40].decode() not in page
    assert "secret" not in page.lower()


def _file_run(path: Path, marker: float) -> None:
    FileSink(path).log_scalars({"erf/head/erf_size": marker, "erf/head/coverage": 0.2}, 0)


def test_report_replaces_a_planted_link_never_writes_through_it(tmp_path: Path) -> None:
    """``erf_report.html`` planted as a link to a file outside: the link is replaced by the
    report, the file it pointed to is untouched."""
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    root = tmp_path / "logs"
    _file_run(root / "run", marker=5.0)
    (root / "erf_report.html").symlink_to(precious)
    out, _ = build_report(root)
    assert out == root / "erf_report.html" and not out.is_symlink()
    assert precious.read_text() == "keep me"
    assert "<html" in out.read_text().lower()
    assert sorted(p.name for p in root.iterdir()) == ["erf_report.html", "run"]  # no temporary


def test_report_skips_empty_and_truncated_images(tmp_path: Path) -> None:
    """PNGs a failed write left behind (empty, cut short) are not embedded; whole ones are."""
    from erf_monitor.viz.render import save_png

    run = tmp_path / "run"
    _file_run(run, marker=5.0)
    layer = run / "heatmaps" / "head"
    save_png(np.full((16, 16, 3), 200, dtype=np.uint8), layer / "step_2.png")
    whole = (layer / "step_2.png").read_bytes()
    (layer / "step_0.png").write_bytes(b"")
    (layer / "step_1.png").write_bytes(whole[: len(whole) // 2])
    out, runs = build_report(tmp_path)
    assert [step for step, _ in runs[0].frames["head"]] == [2]
    assert base64.b64encode(whole).decode() in out.read_text()
