"""Metrics run their small dense algebra on one BLAS thread, and give the threads back."""

from __future__ import annotations

from threadpoolctl import threadpool_info

from erf_monitor.core.threads import single_blas_thread


def blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_one_blas_thread_inside_and_the_old_counts_after() -> None:
    import scipy.linalg  # noqa: F401  (SciPy's BLAS loaded, as the fit loads it)

    before = blas_threads()
    assert before
    with single_blas_thread():
        assert set(blas_threads()) == {1}
        with single_blas_thread():  # nested: still one, and the outer limit survives
            assert set(blas_threads()) == {1}
        assert set(blas_threads()) == {1}
    assert blas_threads() == before
