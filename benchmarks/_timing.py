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
