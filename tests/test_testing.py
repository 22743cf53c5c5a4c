"""``erf_monitor.testing``: ERF budgets pass and fail where they should, with messages that
name the layer, the value with its interval, the bound and the TRF.

The numbers are resnet18's at initialisation on seeded noise at 224 px (layer4 covers about
79% of the input, layer1 about 3%); its TRFs are derived here from the architecture.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import erf_monitor as em
from erf_monitor.probe import plan as plan_module
from erf_monitor.testing import assert_erf, measure_erf, probe_noise

SIZE = 224
SAMPLES = 4


def resnet18_layer1_trf() -> int:
    """conv1 7x7/2, maxpool 3x3/2 (stride 4 after them), then layer1's four 3x3 convolutions
    at stride 4: each adds 2 * 4."""
    r = 7  # conv1
    r += (3 - 1) * 2  # maxpool, input stride 2
    return r + 4 * (3 - 1) * 4


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def test_a_met_budget_returns_the_result(resnet18: nn.Module) -> None:
    builds = plan_module.builds
    r = assert_erf(resnet18, "layer4", input_size=SIZE, min_coverage=0.5, samples=SAMPLES)
    assert 0.70 < r.coverage < 0.85  # ~79%
    # The number is compute_erf's on the documented probe images (seeded noise).
    x = probe_noise(resnet18, SIZE, SAMPLES, seed=0)
    assert x.shape == (SAMPLES, 3, SIZE, SIZE)
    assert em.compute_erf(resnet18, x, ["layer4"])["layer4"].coverage == r.coverage
    # Deterministic, and the plan is cached across calls: no second TRF analysis.
    again = assert_erf(resnet18, "layer4", input_size=SIZE, min_erf_size=150, samples=SAMPLES)
    assert torch.equal(again.heatmap, r.heatmap)
    assert plan_module.builds - builds <= 1


def test_an_impossible_budget_says_so(resnet18: nn.Module) -> None:
    trf = resnet18_layer1_trf()
    with pytest.raises(AssertionError) as info:
        assert_erf(resnet18, "layer1", input_size=SIZE, min_coverage=0.5, samples=SAMPLES)
    text = str(info.value)
    m = re.search(r"coverage (\d+\.\d)% \(95% bootstrap interval (\d+\.\d)% to (\d+\.\d)%", text)
    assert m is not None, text
    value, low, high = (float(g) for g in m.groups())
    assert 1.5 < value < 5.0 and low <= value <= high  # ~3%
    assert "layer 'layer1'" in text and "below min_coverage 50.0%" in text
    assert f"TRF of 'layer1': {trf}x{trf} px" in text
    assert f"allows at most {trf * trf / SIZE**2:.1%} coverage" in text
    assert "impossible for this architecture" in text


def test_a_reachable_bound_fails_without_blaming_the_trf(resnet18: nn.Module) -> None:
    with pytest.raises(AssertionError) as info:
        assert_erf(resnet18, "layer4", input_size=SIZE, max_coverage=0.5, samples=SAMPLES)
    text = str(info.value)
    assert "layer 'layer4'" in text and "above max_coverage 50.0%" in text
    assert "impossible" not in text and "TRF of 'layer4'" in text


def test_measure_erf_for_plain_asserts(resnet18: nn.Module) -> None:
    erf = measure_erf(resnet18, "layer1", input_size=SIZE, samples=SAMPLES)
    assert erf.coverage < 0.1 and isinstance(erf.coverage, float)
    shown = repr(erf.coverage)  # what pytest prints for a failed assert on it
    assert "coverage of 'layer1': 95% bootstrap interval" in shown
    assert "allows at most" in shown


def test_bad_arguments() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="needs a bound"):
        assert_erf(net, "0", input_size=16)
    with pytest.raises(ValueError, match="above max_coverage"):
        assert_erf(net, "0", input_size=16, min_coverage=0.5, max_coverage=0.1)
    with pytest.raises(ValueError, match="Unknown layer 'nope'"):
        assert_erf(net, "nope", input_size=16, min_coverage=0.1)
