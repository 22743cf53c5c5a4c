"""Which forwards are erf-monitor's own: a per-thread "probing" flag, and thread-confined hooks.

A probe (and the TRF trace, and the shape check before it) runs the user's model, so the
user's own hooks fire during it; :func:`is_probing` tells them apart. The flag is per thread:
another thread's forwards, running at the same time, are never a probe's. erf-monitor's own
hooks on the user's model act only in the thread that registered them
(:func:`this_thread_only`), so another thread's forward passes through them untouched. Probes
of several threads run one after the other (:func:`probing` holds a process-wide lock).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = ["StopForward", "is_probing", "probing", "this_thread_only"]

_local = threading.local()
#: One probe at a time in a process: module flags, buffers and random streams are shared by
#: all threads, and each probe saves and restores them (two at once would restore each
#: other's saved state). Re-entrant: a probe's own steps nest.
_LOCK = threading.RLock()
_F = TypeVar("_F", bound=Callable[..., Any])


class StopForward(BaseException):
    """Raised from erf-monitor's own hook once a forward has produced everything wanted (the
    probe's targets, the TRF trace's layers): nothing after it needs to run.

    A ``BaseException`` so that a user's ``except Exception`` in ``forward`` cannot swallow it.
    """


def is_probing() -> bool:
    """True while erf-monitor runs the model in this thread (a probe's forwards, the TRF
    trace, the layer-shape check); False in the user's own forwards and in other threads.

    Use it in your own forward hooks to skip work meant for training steps, e.g. collecting
    activations for a loss term.

    Examples:
        >>> import erf_monitor as em
        >>> em.is_probing()
        False
    """
    return getattr(_local, "depth", 0) > 0


@contextmanager
def probing() -> Iterator[None]:
    """Mark this thread's forwards inside the block as erf-monitor's own (nestable); probes of
    other threads wait until the block ends. Enter it before saving any model state."""
    with _LOCK:
        _local.depth = getattr(_local, "depth", 0) + 1
        try:
            yield
        finally:
            _local.depth -= 1


def this_thread_only(hook: _F) -> _F:
    """``hook``, acting only when called in the thread that wrapped it (in any other thread
    it does nothing and returns ``None``: another thread's forward is left untouched)."""
    owner = threading.get_ident()

    @functools.wraps(hook)
    def confined(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != owner:
            return None
        return hook(*args, **kwargs)

    return confined  # type: ignore[return-value]
