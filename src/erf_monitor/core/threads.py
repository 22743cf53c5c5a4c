"""One BLAS thread for the small dense algebra of the metrics.

The metrics' matrices are small (a field of a few hundred pixels a side) and each call is a
fraction of a millisecond; OpenBLAS still splits them over its threads, whose workers
busy-wait for each other. On a loaded machine that turns a 0.5 ms Cholesky into 100 ms or
more (measured on 2 shared cores). Within :func:`single_blas_thread` NumPy's and SciPy's BLAS
run on the calling thread (``threadpoolctl``); the bootstrap parallelises over resamples instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["single_blas_thread"]

_CONTROLLER: list[Any] = []  # one ThreadpoolController, made on first use


@contextmanager
def single_blas_thread() -> Iterator[None]:
    """Limit the BLAS libraries NumPy and SciPy loaded to one thread inside the block.

    The limit is process-wide (BLAS has no per-thread setting): enter it on the thread that
    orchestrates the work, not inside worker threads.
    """
    if not _CONTROLLER:
        import scipy.linalg  # noqa: F401  (load SciPy's BLAS so that it is found)
        from threadpoolctl import ThreadpoolController

        _CONTROLLER.append(ThreadpoolController())
    with _CONTROLLER[0].limit(limits=1, user_api="blas"):
        yield
