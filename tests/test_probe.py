"""compute_erf against independent derivations, and every non-interference promise."""

from __future__ import annotations

import gc
import math
import warnings
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import erf_monitor as em

# ----------------------------------------------------------------------------- references


def box_profile(n: int, k: int, d: int = 1) -> np.ndarray:
    """n-fold convolution of a width-k box (dilated by d: zeros between taps)."""
    box = np.zeros(d * (k - 1) + 1)
    box[::d] = 1.0
    out = np.array([1.0])
    for _ in range(n):
        out = np.convolve(out, box)
    return out


def ones_stack(n: int, k: int, channels: int = 1, dilation: int = 1) -> nn.Sequential:
    layers = []
    for i in range(n):
        conv = nn.Conv2d(
            channels if i == 0 else 1,
            1,
            k,
            padding=dilation * (k // 2),
            dilation=dilation,
            bias=False,
        )
        nn.init.ones_(conv.weight)
        layers.append(conv)
    return nn.Sequential(*layers)


def placed(profile: np.ndarray, size: int, centre: int) -> np.ndarray:
    """1-D profile placed so that its middle sits at `centre` of a length-`size` axis."""
    out = np.zeros(size)
    half = len(profile) // 2
    for i, v in enumerate(profile):
        j = centre - half + i
        if 0 <= j < size:
            out[j] = v
    return out


def slow_reference(
    model: nn.Module, x: torch.Tensor, layer: str, mode: str = "luo"
) -> torch.Tensor:
    """One sample at a time, one layer at a time, a full forward and backward each."""
    module = dict(model.named_modules())[layer]
    model.eval()
    total = torch.zeros(x.shape[2:], dtype=torch.float64)
    for n in range(x.shape[0]):
        xi = x[n : n + 1].clone().requires_grad_(True)
        store: dict[str, torch.Tensor] = {}

        def keep_first(m: nn.Module, i: object, o: torch.Tensor, store: dict = store) -> None:
            store.setdefault("y", o)

        h = module.register_forward_hook(keep_first)
        try:
            model(xi)
        finally:
            h.remove()
        y = store["y"]
        idx = tuple(s // 2 for s in y.shape[2:])
        seed = y[(0, slice(None), *idx)]
        if mode == "replknet":
            seed = torch.relu(seed)
        (g,) = torch.autograd.grad(seed.sum(), xi)
        g = g[0].double()
        total += (g.clamp_min(0) if mode == "replknet" else g.abs()).sum(0)
    if mode == "replknet":  # RepLKNet averages the per-image maps before the log
        total = torch.log10(total / x.shape[0] + 1)
        return total / total.max()
    return total / x.shape[0]


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        )
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.pool(self.stem(x)))
        return self.head(self.drop(x.mean((2, 3))))


def make_bn_interesting(model: nn.Module) -> None:
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


# ----------------------------------------------------------------------------- exact maps


@pytest.mark.parametrize(("n", "k", "size"), [(1, 3, 11), (3, 3, 21), (2, 5, 20), (4, 3, 16)])
def test_all_ones_stack_is_n_fold_box_convolution(n: int, k: int, size: int) -> None:
    net = ones_stack(n, k)
    res = em.compute_erf(net, torch.randn(3, 1, size, size), layers=[str(n - 1)])
    c = size // 2
    p = placed(box_profile(n, k), size, c)
    expected = np.outer(p, p)
    np.testing.assert_allclose(res[str(n - 1)].heatmap.numpy(), expected, rtol=1e-6)
    # Per-axis variance n(k^2-1)/12 (Luo et al.), measured by the library's sigma.
    var = n * (k * k - 1) / 12
    for s in res[str(n - 1)].sigma:
        assert s == pytest.approx(math.sqrt(var), rel=1e-6)


def test_channels_sum_and_dilation_scales_sigma() -> None:
    n, k, d, size = 2, 3, 2, 25
    net = ones_stack(n, k, channels=2, dilation=d)
    res = em.compute_erf(net, torch.randn(2, 2, size, size), layers=["1"])
    p = placed(box_profile(n, k, d), size, size // 2)
    np.testing.assert_allclose(res["1"].heatmap.numpy(), 2 * np.outer(p, p), rtol=1e-6)
    for s in res["1"].sigma:
        assert s == pytest.approx(d * math.sqrt(n * (k * k - 1) / 12), rel=1e-6)


def test_trf_size_of_stacks() -> None:
    res = em.compute_erf(ones_stack(3, 5, dilation=2), torch.randn(1, 1, 40, 40), layers="2")
    assert res["2"].trf is not None
    assert res["2"].trf.size == (3 * 2 * 4 + 1,) * 2


@pytest.mark.parametrize("size", [(17, 17), (16, 16), (15, 20)])
@pytest.mark.parametrize("mode", ["luo", "replknet"])
def test_batched_probe_matches_slow_per_sample_reference(size: tuple[int, int], mode: str) -> None:
    torch.manual_seed(0)
    net = SmallNet()
    make_bn_interesting(net)
    x = torch.randn(3, 3, *size)
    layers = ["stem", "pool", "block.2", "block"]
    res = em.compute_erf(net, x, layers=layers, mode=mode)  # type: ignore[arg-type]
    for layer in layers:
        ref = slow_reference(net, x, layer, mode).float()
        torch.testing.assert_close(res[layer].heatmap, ref, rtol=1e-4, atol=1e-6)


def test_chunking_and_per_sample_maps() -> None:
    torch.manual_seed(0)
    net = SmallNet()
    x = torch.randn(5, 3, 16, 16)
    full = em.compute_erf(net, x, layers=["block"], keep_per_sample=True)
    chunked = em.compute_erf(net, x, layers=["block"], chunk_size=2, keep_per_sample=True)
    torch.testing.assert_close(full["block"].heatmap, chunked["block"].heatmap)
    per = full["block"].per_sample
    assert per is not None and per.shape == (5, 16, 16)
    torch.testing.assert_close(per.mean(0), full["block"].heatmap)
    torch.testing.assert_close(chunked["block"].per_sample, per)


def test_num_samples_uses_first_samples() -> None:
    torch.manual_seed(0)
    net = SmallNet()
    x = torch.randn(6, 3, 16, 16)
    a = em.compute_erf(net, x, layers="stem", num_samples=2)
    b = em.compute_erf(net, x[:2], layers="stem")
    torch.testing.assert_close(a["stem"].heatmap, b["stem"].heatmap)
    assert a["stem"].num_samples == 2


def test_heatmap_contract() -> None:
    res = em.compute_erf(SmallNet(), torch.randn(2, 3, 16, 16), layers=["block"])
    h = res["block"].heatmap
    assert h.dtype == torch.float32 and h.device.type == "cpu" and h.shape == (16, 16)
    assert not h.requires_grad and h.grad_fn is None
    assert bool((h >= 0).all())


def test_flat_output_layer_is_one_unit() -> None:
    torch.manual_seed(0)
    net = SmallNet()
    x = torch.randn(2, 3, 16, 16)
    res = em.compute_erf(net, x, layers=["head"])
    r = res["head"]
    assert r.output_shape == ()
    assert r.trf is not None and r.trf.is_global
    # Reference: gradient of the sum of all outputs.
    net.eval()
    xi = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xi).sum(), xi)
    torch.testing.assert_close(r.heatmap, g.abs().sum(1).mean(0))


# ----------------------------------------------------------------------------- non-interference


def probe(net: nn.Module, **kw: object) -> em.ERFResults:
    return em.compute_erf(net, torch.randn(2, 3, 16, 16), layers=["stem", "block"], **kw)  # type: ignore[arg-type]


def test_probe_touches_no_grad() -> None:
    net = SmallNet()
    marker = torch.full_like(net.stem[0].weight, 7.0)
    net.stem[0].weight.grad = marker
    probe(net)
    assert net.stem[0].weight.grad is marker and bool((marker == 7).all())
    assert all(p.grad is None for n, p in net.named_parameters() if n != "stem.0.weight")


@pytest.mark.parametrize("train_mode", [False, True])
def test_probe_keeps_batchnorm_statistics(train_mode: bool) -> None:
    net = SmallNet()
    make_bn_interesting(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe(net, train_mode=train_mode)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_probe_restores_every_training_flag() -> None:
    net = SmallNet().train()
    net.stem.eval()  # a frozen part in eval mode, as users do
    net.drop.train()
    flags = {n: m.training for n, m in net.named_modules()}
    probe(net)
    assert {n: m.training for n, m in net.named_modules()} == flags


@pytest.mark.parametrize("train_mode", [False, True])
def test_probe_leaves_global_rng_state(train_mode: bool) -> None:
    net = SmallNet()
    x = torch.randn(2, 3, 16, 16)
    state = torch.get_rng_state()
    em.compute_erf(net, x, layers=["block"], train_mode=train_mode)  # dropout draws in train mode
    assert torch.equal(torch.get_rng_state(), state)


def test_probe_leaves_no_hook_behind() -> None:
    net = SmallNet()
    probe(net)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_no_hook_left_when_model_raises_midway() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    net = nn.Sequential(nn.Conv2d(3, 4, 3), Boom(), nn.Conv2d(4, 4, 3))
    with pytest.raises(em.ERFProbeError, match="boom"):
        em.compute_erf(net, torch.randn(1, 3, 8, 8), layers=["2"], trf="skip")
    assert all(not m._forward_hooks for m in net.modules())


def test_no_autograd_graph_kept_alive() -> None:
    net = SmallNet()
    saved: list[weakref.ref] = []

    class Box:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

    def pack(t: torch.Tensor) -> Box:
        box = Box(t)
        saved.append(weakref.ref(box))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda b: b.t):
        res = probe(net)
    gc.collect()
    assert saved, "the probe should have built a graph"
    assert all(r() is None for r in saved), "tensors saved for backward are still alive"
    assert res["block"].heatmap.grad_fn is None


def test_inputs_not_modified_and_not_aliased() -> None:
    x = torch.randn(2, 3, 16, 16)
    copy = x.clone()
    em.compute_erf(SmallNet(), x, layers=["block"])
    assert torch.equal(x, copy) and not x.requires_grad


def test_works_under_no_grad_inference_mode_and_autocast() -> None:
    torch.manual_seed(0)
    net = SmallNet()
    x = torch.randn(2, 3, 16, 16)
    ref = em.compute_erf(net, x, layers=["block"])["block"].heatmap
    with torch.no_grad():
        a = em.compute_erf(net, x, layers=["block"])["block"].heatmap
    with torch.inference_mode():
        xi = x.clone()  # an inference tensor
        assert xi.is_inference()
        b = em.compute_erf(net, xi, layers=["block"])["block"].heatmap
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = em.compute_erf(net, x, layers=["block"])["block"].heatmap
    for h in (a, b, c):
        assert h.dtype == torch.float32
        torch.testing.assert_close(h, ref)


def test_compiled_module_is_probed_eagerly() -> None:
    net = SmallNet()
    compiled = torch.compile(net)  # never run: the probe must use the eager module
    x = torch.randn(2, 3, 16, 16)
    a = em.compute_erf(compiled, x, layers=["block"])["block"].heatmap
    b = em.compute_erf(net, x, layers=["_orig_mod.block"])["_orig_mod.block"].heatmap
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- errors


def test_unknown_layer_lists_close_matches() -> None:
    with pytest.raises(ValueError, match=r"Unknown layer 'blok'.*'block'"):
        em.compute_erf(SmallNet(), torch.randn(1, 3, 16, 16), layers=["blok"])


def test_layer_not_reached() -> None:
    net = SmallNet()
    net.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="never called during the forward"):
        em.compute_erf(net, torch.randn(1, 3, 16, 16), layers=["unused"], trf="skip")


def test_input_without_spatial_dims() -> None:
    with pytest.raises(ValueError, match="no spatial dims"):
        em.compute_erf(nn.Linear(4, 4), torch.randn(2, 4), layers="*")


def test_input_smaller_than_kernel() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 7))
    with pytest.raises(em.ERFProbeError, match="smaller than a kernel"):
        em.compute_erf(net, torch.randn(1, 3, 4, 4), layers=["0"], trf="skip")


def test_nan_gradient_is_an_error() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(em.ERFProbeError, match=r"'1'.*NaN or Inf"):
        em.compute_erf(net, torch.randn(1, 3, 8, 8), layers=["1"])


def test_dead_network_warns_and_gives_zero_map() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    with torch.no_grad():
        net[0].bias.fill_(-1e4)
    with pytest.warns(em.ERFProbeWarning, match="zero everywhere"):
        res = em.compute_erf(net, torch.randn(2, 3, 8, 8), layers=["2"])
    h = res["2"].heatmap
    assert bool((h == 0).all()) and not bool(torch.isnan(h).any())
    assert res["2"].coverage == 0.0


def test_tuple_output_rejected_with_explanation() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    net = nn.Sequential(nn.Conv2d(3, 3, 3), Pair())
    msg = r"returned a tuple of 2 \(tensor \(1, 3, 6, 6\).*e\.g\. '1\[0\]'"
    with pytest.raises(ValueError, match=msg):
        em.compute_erf(net, torch.randn(1, 3, 8, 8), layers=["1"], trf="skip")
    res = em.compute_erf(net, torch.randn(1, 3, 8, 8), layers=["1[1]"], trf="skip")
    assert res["1[1]"].trf is None and res["1[1]"].heatmap.shape == (8, 8)


def test_bad_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        em.compute_erf(SmallNet(), torch.randn(1, 3, 8, 8), layers="stem", mode="max")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- layers


def test_globs_and_auto_layers_on_resnet() -> None:
    tv = pytest.importorskip("torchvision")
    net = tv.models.resnet18()
    res = em.compute_erf(net, torch.randn(1, 3, 64, 64), layers="layer*")
    assert list(res) == ["layer1", "layer2", "layer3", "layer4"]
    auto = em.compute_erf(net, torch.randn(1, 3, 64, 64), layers="auto", trf="skip")
    assert list(auto) == ["relu", "layer1", "layer2", "layer3", "layer4"]


def test_shared_module_measures_first_call() -> None:
    tv = pytest.importorskip("torchvision")
    net = tv.models.resnet18()
    x = torch.randn(1, 3, 32, 32)
    res = em.compute_erf(net, x, layers=["layer1.0.relu", "layer1.0.bn1"], trf="skip")
    # Bottleneck/BasicBlock reuse one ReLU module; the probe measures its first call (after bn1).
    assert res["layer1.0.relu"].num_calls >= 1
    ref = slow_reference(net, x, "layer1.0.relu")  # the hook there also records the first call
    torch.testing.assert_close(res["layer1.0.relu"].heatmap, ref.float(), rtol=1e-4, atol=1e-7)
