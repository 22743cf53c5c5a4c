"""The with/without harness of the overhead benchmarks (``bench_overhead.py`` for Lightning,
``bench_hf_callback.py`` for the transformers Trainer): the callback's own time measured by
wrapping its hooks, arms interleaved in alternating order, and the two figures printed."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def time_methods(obj: Any, names: Sequence[str], spent: list[float]) -> None:
    """Wrap ``obj``'s methods ``names`` (as instance attributes) to add their wall time to
    ``spent[0]``."""
    for name in names:
        original = getattr(obj, name)

        def timed(*args: Any, _f: Any = original, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0

        setattr(obj, name, timed)


def interleaved_arms(
    run: Callable[[bool, str], tuple[float, float]], repeats: int, tmp: str
) -> tuple[dict[str, list[float]], list[float]]:
    """``run(with_callback, out_dir) -> (wall s, s inside the callback)`` for both arms,
    ``repeats`` times in alternating order. Returns the wall times per arm and, per callback
    run, the share of its wall time spent inside the callback."""
    times: dict[str, list[float]] = {"without": [], "with": []}
    inside: list[float] = []
    for r in range(repeats):
        for arm in ("without", "with") if r % 2 == 0 else ("with", "without"):
            wall, spent = run(arm == "with", os.path.join(tmp, f"{arm}{r}"))
            times[arm].append(wall)
            if arm == "with":
                inside.append(spent / wall)
    return times, inside


def print_overhead(
    console: Any, title: str, inside_what: str, times: dict[str, list[float]], inside: list[float]
) -> tuple[dict[str, float], float]:
    """Print the arms' table, the wall-time overhead and the share inside the callback
    (``inside_what``: e.g. "ERFMonitor's hooks"). Returns the medians and the overhead."""
    from rich.table import Table

    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = (med["with"] - med["without"]) / med["with"]
    table = Table(title=title)
    for col in ("arm", "median s", "all s"):
        table.add_column(col, justify="right")
    for arm, ts in times.items():
        table.add_row(arm, f"{med[arm]:.2f}", " ".join(f"{t:.2f}" for t in ts))
    console.print(table)
    console.print(
        f"overhead = (with - without) / with = [bold]{100 * overhead:.2f}%[/] of wall time "
        f"(load {os.getloadavg()[0]:.2f}; noisy on a shared machine)"
    )
    runs = ", ".join(f"{100 * v:.2f}%" for v in inside)
    console.print(
        f"time inside {inside_what} / wall time of the same run = "
        f"[bold]{100 * statistics.median(inside):.2f}%[/] (median; runs: {runs})"
    )
    return med, overhead
