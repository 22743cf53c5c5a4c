"""Exact maps in every precision (issue 25, item 3).

Half and bfloat16 models are probed in float32 (float32 copies of their weights, the model
untouched); a seed whose channel sum is constant over the probe samples, zero or not, is
probed again in float64. References: float64 copies of the same weights, one image at a
time, plain autograd (``tests/references.py``), never the probe.
"""

from __future__ import annotations

import copy
import warnings

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


def bf16_net() -> torch.nn.Sequential:
    """A small bfloat16 model whose layer "2" sees a 5 x 5 field."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 8, 3)
    ).to(torch.bfloat16)


def test_dtype_opts_out_of_the_float32_probe() -> None:
    net = bf16_net()
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
    net = bf16_net()
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


# ----------------------------------------------------------------------------- constant seeds


def _convnext_with_uniform_norm_bias() -> torch.nn.Module:
    # Bias-only fine-tuning or a custom init: every LayerNorm has a uniform weight and a
    # non-zero bias, so the channel sum of a stage's output is a constant 96 * 0.1 = 9.6 plus
    # the blocks' 1e-6-scaled branches: far from zero, and float32 rounding noise again.
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = tv.models.convnext_tiny().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.constant_(m.bias, 0.1)
    return net


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_a_constant_non_zero_seed_is_probed_in_float64(chunk_size: int | None) -> None:
    net = _convnext_with_uniform_norm_bias()
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = em.compute_erf(net, x, ["features.1"], chunk_size=chunk_size)
    assert not [str(w.message) for w in rec if issubclass(w.category, em.ERFProbeWarning)]
    expected = one_layer_reference(copy.deepcopy(net).double(), x.double(), "features.1")
    assert relative_error(res["features.1"].heatmap, expected) < 0.01  # was 2.5x its max


def test_the_same_image_twice_is_not_a_constant_seed() -> None:
    # Two copies of one image: the seed is the same twice, which says nothing about inputs.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Tanh(), torch.nn.Conv2d(8, 8, 3))
    x = torch.randn(1, 3, 12, 12).expand(2, -1, -1, -1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = em.compute_erf(net, x, ["2"])
    assert not [str(w.message) for w in rec if issubclass(w.category, em.ERFProbeWarning)]
    expected = one_layer_reference(copy.deepcopy(net).double(), x.double(), "2")
    assert relative_error(res["2"].heatmap, expected) < 1e-5


def test_a_seed_constant_in_float64_too_is_warned_about() -> None:
    # A bare LayerNorm over the channels with a non-zero bias: its channel sum is 8 * 0.5
    # for every input, so the ERF is zero by construction.
    class Norm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.norm = torch.nn.LayerNorm(8)
            torch.nn.init.constant_(self.norm.bias, 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        em.compute_erf(torch.nn.Sequential(Norm()), torch.randn(2, 3, 16, 16), ["0"])
    text = [str(w.message) for w in rec if issubclass(w.category, em.ERFProbeWarning)]
    assert any("constant" in m and "float64" in m for m in text), text


# ----------------------------------------------------------------------------- masked logits


def test_float64_swin_t_keeps_its_exact_corner_trfs() -> None:
    # Swin's -100-masked logits are no dependence (docs/guides/vit.md); a float64 gradient
    # still reaches through them at the exp(-100) level (5e-44 of the mass), which the
    # consistency check took for a wrong TRF.
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = tv.models.swin_t().double().eval()
    x = torch.randn(2, 3, 112, 112, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = em.compute_erf(net, x, ["features.1"], position="corners")
    assert not [str(w.message) for w in rec if issubclass(w.category, em.ERFProbeWarning)]
    field = res["features.1"].field
    assert field is not None
    corner = field["corner_top_left"]
    # stage 1: 4 px patches, 7 x 7 windows; the corner token's shifted window is split by the
    # mask, so it reads its own plain window only: pixels 0..27.
    assert corner.trf is not None and corner.trf.clipped == ((0, 27), (0, 27))
    # The map itself, written plainly (channels-last output, token (0, 0), one image at a
    # time): all but an exp(-100)-sized part of it inside the TRF.
    total = torch.zeros(112, 112, dtype=torch.float64)
    for n in range(2):
        xi = x[n : n + 1].clone().requires_grad_(True)
        y = net.features[1](net.features[0](xi))
        (g,) = torch.autograd.grad(y[0, 0, 0, :].sum(), xi)
        total += g[0].abs().sum(0) / 2
    assert relative_error(corner.heatmap, total) < 1e-6
    assert 0 < float(total[28:, :].sum() + total[:28, 28:].sum()) < 1e-40 * float(total.sum())


def test_masked_trfs_still_reject_real_spills() -> None:
    from erf_monitor.probe.results import _checked_trf
    from erf_monitor.trf.types import TRF

    trf = TRF(
        size=(4.0, 4.0), stride=(1.0, 1.0), interval=((0, 3), (0, 3)), clipped=((0, 3), (0, 3)),
        global_dims=(False, False), centre=(1.5, 1.5), output_centre=(0, 0),
        output_shape=(8, 8), input_shape=(8, 8), method="fx", masked=True,
    )  # fmt: skip
    heat = torch.zeros(8, 8, dtype=torch.float64)
    heat[:4, :4] = 1.0
    heat[7, 7] = 1e-43 * 16  # exp(-100)-sized: the rule
    assert _checked_trf(trf, heat) == (trf, None)
    heat[7, 7] = 1e-9 * 16  # a real dependence the walk missed
    assert _checked_trf(trf, heat)[0] is None
