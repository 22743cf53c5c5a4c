"""The timing loop every benchmark shares: variants interleaved in a rotating order."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def _wall(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(
    variants: dict[str, Callable[[], Any]],
    repeats: int,
    *,
    warmup: bool = False,
    timer: Callable[[Callable[[], Any]], float] = _wall,
) -> dict[str, list[float]]:
    """Run every variant once per repeat, the order rotating by one each repeat (load from
    other processes then hits every variant alike); return every variant's times.

    ``warmup``: run each variant once, untimed, first (imports, caches, allocator).
    ``timer``: how one call is timed (default: wall time; a GPU benchmark synchronises).
    """
    if warmup:
        for fn in variants.values():
            fn()
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(timer(variants[name]))
    return times


def interleaved_cpu(
    variants: dict[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """:func:`interleaved`, also taking each call's process CPU time (the fair measure on a
    shared machine): ``(cpu, wall)`` times per variant."""
    cpu: dict[str, list[float]] = {name: [] for name in variants}

    def cpu_timed(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            t0 = time.process_time()
            out = fn()
            cpu[name].append(time.process_time() - t0)
            return out

        return run

    timed = {name: cpu_timed(name, fn) for name, fn in variants.items()}
    return cpu, interleaved(timed, repeats)
