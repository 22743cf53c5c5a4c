"""Reading an offline W&B run's history rows back from its ``run-*.wandb`` record log."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from conftest import HANG_GUARD_S

__all__ = ["wandb_alerts", "wandb_history", "wandb_summary"]


def wandb_history(run_dir: Path, timeout: float = HANG_GUARD_S) -> list[dict[str, Any]]:
    """History rows of an offline run, from its ``run-*.wandb`` record log (LevelDB format).

    wandb-core sometimes writes the records shortly *after* ``run.finish()`` returns (seen with
    wandb 0.31: the file still holds only its 7-byte header), so wait for the exit record
    (a hang guard, never a speed limit).
    """
    return _wait(run_dir, timeout)[0]


def wandb_alerts(run_dir: Path, timeout: float = HANG_GUARD_S) -> list[tuple[str, str, str]]:
    """``run.alert`` records of an offline run: ``(title, text, level)``, level ``"WARN"``..."""
    return _wait(run_dir, timeout)[1]


def wandb_summary(run_dir: Path, timeout: float = HANG_GUARD_S) -> dict[str, Any]:
    """The run's summary as its summary records left it (``run.summary[key] = ...``)."""
    return _wait(run_dir, timeout)[2]


def _wait(
    run_dir: Path, timeout: float
) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]], dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows, done, alerts, summary = _read_wandb_log(next(run_dir.glob("run-*.wandb")))
        if done or time.monotonic() > deadline:
            return rows, alerts, summary
        time.sleep(0.1)


def _read_wandb_log(
    path: Path,
) -> tuple[list[dict[str, Any]], bool, list[tuple[str, str, str]], dict[str, Any]]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        if pos + 7 + length > len(data):
            break  # wandb-core is still writing this record: read again until the exit record
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    rows, done, alerts, summary = [], False, [], {}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        done = done or record.WhichOneof("record_type") == "exit"
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        if record.WhichOneof("record_type") == "alert":
            alerts.append((record.alert.title, record.alert.text, record.alert.level))
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows, done, alerts, summary
