"""Inputs too small for the layers asked for: one warning naming the layer, its grid and the
input that gives it one (issue 28); ``auto`` says which stages it dropped."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import erf_monitor as em
from erf_monitor.cli.main import main
from erf_monitor.monitor.engine import MonitorEngine

tv = pytest.importorskip("torchvision")


def _stride_net() -> nn.Sequential:
    """Three stride-2 3x3 convolutions (padding 1): n -> ceil(n / 8) units, so the smallest
    input with 2 output units is 9 px (derived by hand: 9 -> 5 -> 3 -> 2)."""
    return nn.Sequential(*[nn.Conv2d(1, 1, 3, stride=2, padding=1) for _ in range(3)])


def test_resnet18_on_8x8_warns_naming_layer4() -> None:
    net = tv.models.resnet18()
    with pytest.warns(em.ERFInputWarning) as rec:
        em.compute_erf(net, torch.randn(1, 3, 8, 8), layers=["layer4"])
    (w,) = [w for w in rec if issubclass(w.category, em.ERFInputWarning)]
    text = str(w.message)
    # layer4 has stride 32: 33 px is the first size whose output has 2 units (by hand:
    # 33 -> conv1 17 -> maxpool 9 -> layer2 5 -> layer3 3 -> layer4 2; 32 gives 1).
    assert "'layer4' (output 1x1, needs >= 33x33 px)" in text
    assert text.startswith("Input 8x8 px is too small")


def test_smallest_input_is_exact_and_large_enough_inputs_are_quiet() -> None:
    net = _stride_net()
    with pytest.warns(em.ERFInputWarning, match=r"'2' \(output 1x1, needs >= 9x9 px\)"):
        em.compute_erf(net, torch.randn(1, 1, 8, 8), layers=["2"])
    with pytest.warns(em.ERFInputWarning, match=r"Input 1x1 px"):
        em.compute_erf(net, torch.randn(1, 1, 1, 1), layers=["0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", em.ERFInputWarning)
        em.compute_erf(net, torch.randn(1, 1, 9, 9), layers=["2"])  # 2x2: no warning


def test_global_pool_output_is_not_too_small() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", em.ERFInputWarning)
        em.compute_erf(net, torch.randn(1, 1, 16, 16), layers=["1"])  # 1x1 by design


def test_strict_monitor_raises() -> None:
    eng = MonitorEngine(layers=["2"], num_samples=1, min_coverage=None, strict=True)
    eng.set_probe_batch(torch.randn(1, 1, 8, 8))
    with pytest.raises(em.ERFInputWarning, match="needs >= 9x9"):
        eng.probe(_stride_net(), 0)


def test_analyze_input_size_4_lists_dropped_stages(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["analyze", "torchvision:resnet18", "--input-size", "4", "--samples", "1",
                 "--out", str(tmp_path), "--quiet"])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert "layers='auto' dropped layer1, layer2, layer3, layer4" in err
    assert "1x1 on this 4x4 input" in err and "at least 33x33 px keeps them" in err
    out = " ".join(captured.out.split())
    assert "ERF/TRF above 1" in out  # relu's 5 px square over its 4 px clipped TRF
