"""Suite-wide settings.

pytest-xdist runs two workers on CI's two cores; one intra-op thread per worker avoids the
OpenMP oversubscription that made CPU convolutions 10-50x slower on this kind of machine.

A skipped test proves nothing: when the environment variable ``CI`` is set (``.ci/run``
exports ``CI=true``), every skip, in a test or while collecting a module (``importorskip``),
is reported as a failure that names its reason. Locally, without ``CI``, a developer who
lacks an optional package still runs the rest of the suite (skips are listed by ``-ra``).
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MPLBACKEND", "Agg")

#: Where a test waits for a subprocess or a file, it waits this long before calling it a
#: hang: a guard against a deadlock, never a speed check (the slowest of those runs takes
#: under 2 minutes on a loaded 2-core machine).
HANG_GUARD_S = 1800


def skips_fail() -> bool:
    """Whether a skip counts as a failure (in CI)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _fail_if_skipped(report: Any) -> None:
    if skips_fail() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI is set, so a skip fails): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, None]:
    outcome = yield
    _fail_if_skipped(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    _fail_if_skipped(outcome.get_result())


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker() -> None:
    torch.set_num_threads(1)
