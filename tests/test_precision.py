"""Exact maps in every precision (issue 25, item 3).

Half and bfloat16 models are probed in float32 (float32 copies of their weights, the model
untouched); a seed whose channel sum is constant over the probe samples, zero or not, is
probed again in float64. References: float64 copies of the same weights, one image at a
time, plain autograd (``tests/references.py``), never the probe.
"""

from __future__ import annotations

import copy

import pytest
import torch

import erf_monitor as em
from references import one_layer_reference


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_resnet18_maps_match_float64_in_every_stage(dtype: torch.dtype) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = tv.models.resnet18().eval().to(dtype)
    x = torch.randn(2, 3, 64, 64).to(dtype)  # images the model's dtype represents exactly
    before = {k: v.clone() for k, v in net.state_dict().items()}
    layers = ["layer1", "layer2", "layer3", "layer4"]
    res = em.compute_erf(net, x, layers)
    ref = copy.deepcopy(net).double()
    for name in layers:
        expected = one_layer_reference(ref, x.double(), name)
        # was 8-15% (bfloat16) and 1.2-5.6% (float16) of the maximum off
        assert relative_error(res[name].heatmap, expected) < 0.01, name
    # The user's weights are neither cast nor changed, and no gradient is left on them.
    after = net.state_dict()
    assert all(after[k].dtype == dtype or not v.is_floating_point() for k, v in before.items())
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in net.parameters())


def test_dtype_opts_out_of_the_float32_probe() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 8, 3)
    ).to(torch.bfloat16)
    x = torch.randn(2, 3, 12, 12)
    exact = em.compute_erf(net, x, ["2"])["2"]
    native = em.compute_erf(net, x, ["2"], dtype=torch.bfloat16)["2"]
    # The same map in the model's own dtype: computed with bfloat16 arithmetic (a bfloat16
    # input, a bfloat16 gradient), which a float32 probe does not round to.
    xb = x.to(torch.bfloat16).requires_grad_(True)
    y = net(xb)
    (g,) = torch.autograd.grad(y[:, :, y.shape[2] // 2, y.shape[3] // 2].sum(), xb)
    assert g.dtype == torch.bfloat16
    assert torch.equal(native.heatmap, g.float().abs().sum(1).mean(0))
    expected = one_layer_reference(copy.deepcopy(net).double(), x.double(), "2")
    assert relative_error(exact.heatmap, expected) < 1e-5
    assert relative_error(native.heatmap, expected) > 1e-4


def test_theoretical_rf_of_a_half_model() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3, stride=2))
    trf = em.theoretical_rf(net.to(torch.bfloat16), (3, 16, 16), ["1"])["1"]
    assert trf.size == (5.0, 5.0) and trf.stride == (2.0, 2.0)


def test_a_monitor_probes_a_half_model_in_float32() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 8, 3)
    ).to(torch.bfloat16)
    x = torch.randn(2, 3, 12, 12)
    w = em.watch(net, layers=["2"], every_n_steps=1, probe_inputs=x, min_coverage=None,
                 summary=False)  # fmt: skip
    try:
        res = w.step()
    finally:
        w.close()
    assert res is not None
    expected = one_layer_reference(copy.deepcopy(net).double(), x.double(), "2")
    assert relative_error(res["2"].heatmap, expected) < 1e-5
