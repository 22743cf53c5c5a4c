"""Lean input-only backwards (``probe/lean.py``): the probe's convolutions differentiate only
the box a seed's gradient reaches, eval BatchNorms as the affine maps they are. Every result
is checked against autograd's own full kernels (the independent reference) or against the
plain one-layer, one-image reference."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import erf_monitor as em
from erf_monitor.core.index import model_index
from erf_monitor.probe import lean
from references import one_layer_reference

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@pytest.fixture
def lean_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Every module lean whatever its size (the tests' models are small), and a count of the
    lean convolution backwards that ran."""
    monkeypatch.setattr(lean, "_MIN_ELEMENTS", 0)
    calls = {"conv": 0}
    real = lean.conv_input_grad

    def counted(*args: Any) -> Any:
        calls["conv"] += 1
        return real(*args)

    monkeypatch.setattr(lean, "conv_input_grad", counted)
    return calls


def _full_input_grad(x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, **kw: Any) -> Any:
    """Autograd's own input gradient of the convolution (the reference)."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_CONV[x.dim() - 2](x, w, **kw), x, grad)
    return g


def _sparse_grad(shape: torch.Size, rng: random.Random, dtype: torch.dtype) -> torch.Tensor:
    """Zero but for a random box (sometimes on a border, sometimes everything, or nothing)."""
    g = torch.zeros(shape, dtype=dtype)
    kind = rng.random()
    if kind < 0.1:
        return g
    box = []
    for n in shape[2:]:
        if kind > 0.9:
            box.append(slice(0, n))
        else:
            a = rng.randrange(n)
            box.append(slice(a, rng.randrange(a, n) + 1))
    part = g[(slice(None), slice(None), *box)]
    part.copy_(torch.randn(part.shape, dtype=dtype))
    part[part.abs() < 0.3] = 0  # holes inside the box, as ReLU masks make
    return g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(40))
def test_the_input_gradient_over_the_box_equals_the_full_kernel(
    seed: int, dtype: torch.dtype
) -> None:
    rng = random.Random(seed)
    nd = rng.choice([1, 2, 2, 3])
    groups = rng.choice([1, 2])
    k = [rng.choice([1, 2, 3, 5]) for _ in range(nd)]
    stride = [rng.choice([1, 2, 3]) for _ in range(nd)]
    dilation = [rng.choice([1, 1, 2]) for _ in range(nd)]
    padding = [rng.randrange(0, kk * d // 2 + 2) for kk, d in zip(k, dilation)]
    if seed % 3 == 0:  # a 1 x 1 convolution (its own matrix-product path)
        groups, k, padding = 1, [1] * nd, [0] * nd
    size = [kk * d + rng.randrange(1, 4 if nd == 3 else 12) for kk, d in zip(k, dilation)]
    x = torch.randn(2, 2 * groups, *size, dtype=dtype)
    w = torch.randn(3 * groups, 2, *k, dtype=dtype)
    kw = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    out_shape = _CONV[nd](x, w, **kw).shape
    grad = _sparse_grad(out_shape, rng, dtype)
    want = _full_input_grad(x, w, grad, **kw)
    got = lean.conv_input_grad(grad, x.shape, w, stride, padding, dilation, groups)
    assert got.shape == want.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(got, want, rtol=tol, atol=tol), (got - want).abs().max()


def test_the_nonzero_box_is_the_tightest_box() -> None:
    g = torch.zeros(2, 3, 7, 9)
    assert lean.nonzero_box(g) is None
    g[1, 2, 3, 4] = float("nan")
    g[0, 0, 5, 2] = -1.0
    assert lean.nonzero_box(g) == ((3, 5), (2, 4))


class _Net(nn.Module):
    """Convolutions of every kind the lean backward takes (strided, dilated, grouped, 1x1),
    eval BatchNorms, an in-place ReLU on a BatchNorm's output and a residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, stride=2, padding=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.dil = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.point = nn.Conv2d(8, 16, 1)
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.head = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn(self.stem(x)))
        h = h + self.bn2(self.dil(h))
        h = self.down(torch.relu(self.point(h)))
        return self.head(h)


def _randomised(net: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics that are not the identity
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("layer", ["dil", "down", "head"])
def test_probe_maps_equal_the_plain_reference(layer: str, lean_calls: dict[str, int]) -> None:
    net = _randomised(_Net())
    x = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    res = em.compute_erf(net, x, [layer], crop=False)
    assert lean_calls["conv"] > 0
    want = one_layer_reference(net, x, layer)
    got = res[layer].heatmap
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.max()))


def _probe_without_lean(monkeypatch: pytest.MonkeyPatch, fn: Any) -> Any:
    with monkeypatch.context() as m:
        m.setattr("erf_monitor.probe.run.lean_modules", lambda index: ())
        return fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_grid_probe_is_the_same_with_and_without_lean_backwards(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = _randomised(tv.models.resnet18()).to(dtype)
    x = torch.randn(4, 3, 96, 96, dtype=dtype, generator=torch.Generator().manual_seed(2))
    used = [0]
    real = lean.conv_input_grad

    def counted(*args: Any) -> Any:
        used[0] += 1
        return real(*args)

    monkeypatch.setattr(lean, "conv_input_grad", counted)

    def run() -> Any:
        return em.compute_erf(net, x, ["layer2", "layer3"], position="grid:3", dtype=dtype)

    got = run()
    assert used[0] > 0  # the lean backward ran, at its default size threshold
    want = _probe_without_lean(monkeypatch, run)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name in ("layer2", "layer3"):
        a, b = got[name].field, want[name].field
        assert a is not None and b is not None
        for key in b:
            ma, mb = a[key].heatmap.double(), b[key].heatmap.double()
            assert float((ma - mb).abs().max()) <= tol * float(mb.abs().max()), (name, key)


def test_the_models_own_hooks_are_differentiated_on_top_of_the_lean_backward(
    lean_calls: dict[str, int],
) -> None:
    """Forward hooks of the model's that change a convolution's or a BatchNorm's output (a new
    tensor, or in place) are part of the model: they are differentiated on top of the lean
    backward, and the map is the plain reference's."""
    net = _randomised(_Net())

    def doubled_right_half(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
        scale = torch.ones_like(out)
        scale[..., out.shape[-1] // 2 :] = 2.0
        return out * scale

    def tripled_in_place(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        out[..., : out.shape[-2] // 2, :].mul_(3.0)

    handles = [
        net.point.register_forward_hook(doubled_right_half),
        net.bn2.register_forward_hook(tripled_in_place),
    ]
    try:
        assert net.point in lean.lean_modules(model_index(net))
        x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))
        res = em.compute_erf(net, x, ["head"], crop=False)
        assert lean_calls["conv"] > 0
        want = one_layer_reference(net, x, "head")
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(res["head"].heatmap, want, rtol=1e-5, atol=1e-6 * float(want.max()))


def test_train_mode_batch_norms_keep_their_own_backward(
    monkeypatch: pytest.MonkeyPatch, lean_calls: dict[str, int]
) -> None:
    """In a train-mode probe BatchNorm uses the batch's statistics (not an affine map): its
    backward stays autograd's, and the maps equal those without lean backwards."""
    net = _randomised(_Net())
    x = torch.randn(4, 3, 40, 40, generator=torch.Generator().manual_seed(4))

    def run() -> Any:
        return em.compute_erf(net, x, ["head"], train_mode=True)

    got = run()["head"].heatmap
    assert lean_calls["conv"] > 0  # the convolutions are lean, the BatchNorms are not
    want = _probe_without_lean(monkeypatch, run)["head"].heatmap
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.max()))


def test_no_hook_is_left_on_the_model(lean_calls: dict[str, int]) -> None:
    net = _randomised(_Net())
    em.compute_erf(net, torch.randn(2, 3, 40, 40), ["down", "head"], position="grid:2")
    assert lean_calls["conv"] > 0
    assert all(not m._forward_hooks for m in net.modules())


def test_a_small_probe_keeps_autograds_backwards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below ``_MIN_ELEMENTS`` input elements no lean hook is even registered (their Python
    would cost what the kernels save): a CIFAR-sized probe runs as before."""
    registered = [0]
    real = nn.Module.register_forward_hook

    def counted(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        registered[0] += kwargs.get("prepend", False)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "register_forward_hook", counted)
    net = _randomised(_Net())
    em.compute_erf(net, torch.randn(8, 3, 32, 32), ["head"], crop=False)
    assert registered[0] == 0
    em.compute_erf(net, torch.randn(8, 3, 96, 96), ["head"], crop=False)
    assert registered[0] > 0


def test_convolutions_padded_by_name_or_not_with_zeros_are_left_to_autograd() -> None:
    """``padding="same"`` may pad unevenly and ``padding_mode`` other than zeros pads with
    values: neither is the zero-padded convolution the lean backward computes."""
    net = nn.Sequential(
        nn.Conv2d(3, 4, 4, padding="same"),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 4, 3, padding=1),
    )
    assert lean.lean_modules(model_index(net)) == (net[2],)
