"""The HTML report treats what it reads back as data: it never unpickles a map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from erf_monitor._report import build_report
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
