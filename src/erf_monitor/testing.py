"""Helpers for test suites: ERF budgets as assertions.

Guard a design property of an architecture the way shapes and FLOPs are guarded::

    from erf_monitor.testing import assert_erf

    def test_last_stage_sees_half_the_image():
        assert_erf(torchvision.models.resnet18(), "layer4", input_size=224, min_coverage=0.5)

:func:`assert_erf` raises ``AssertionError`` with the measured value, its bootstrap interval,
the bound and the layer's TRF (see :mod:`erf_monitor.monitor.budgets`).
"""

from erf_monitor.monitor.budgets import assert_erf, probe_noise

__all__ = ["assert_erf", "probe_noise"]
