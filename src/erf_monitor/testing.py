"""Helpers for test suites: ERF budgets as assertions.

Guard a design property of an architecture the way shapes and FLOPs are guarded::

    from erf_monitor.testing import assert_erf, measure_erf

    def test_last_stage_sees_half_the_image():
        assert_erf(torchvision.models.resnet18(), "layer4", input_size=224, min_coverage=0.5)

    def test_first_stage_stays_local():  # plain asserts: pytest prints interval and TRF
        assert measure_erf(torchvision.models.resnet18(), "layer1", input_size=224).coverage < 0.1

:func:`assert_erf` raises ``AssertionError`` with the measured value, its bootstrap interval,
the bound and the layer's TRF (see :mod:`erf_monitor.monitor.budgets`).
"""

from erf_monitor.monitor.budgets import (
    Measured,
    MeasuredERF,
    assert_erf,
    measure_erf,
    probe_noise,
)

__all__ = ["Measured", "MeasuredERF", "assert_erf", "measure_erf", "probe_noise"]
