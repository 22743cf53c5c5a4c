"""Tests of the theoretical receptive field analysis (``erf_monitor.trf.analysis``).

Every expected number is derived by hand in the test (interval recurrences written out), or is a
published value, never taken from the code under test.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from erf_monitor import theoretical_rf
from erf_monitor.core.errors import ERFProbeWarning


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # The test machine is shared: OpenMP spin-waiting on busy cores makes CPU convs 10-50x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def conv_stack(n: int, k: int, d: int = 1, dims: int = 2, ch: int = 2) -> nn.Sequential:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    layers: list[nn.Module] = []
    for i in range(n):
        layers.append(conv(1 if i == 0 else ch, ch, k, padding=d * (k // 2), dilation=d))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def both(model: nn.Module, shape: tuple[int, ...], layer: str) -> tuple:
    return tuple(theoretical_rf(model, shape, [layer], method=m)[layer] for m in ("fx", "numeric"))


# ----------------------------------------------------------------------------- conv stacks


@pytest.mark.parametrize(("n", "k", "d"), [(3, 3, 1), (2, 5, 1), (4, 3, 2), (2, 3, 3)])
def test_conv_stack_size_and_interval(n: int, k: int, d: int) -> None:
    net = conv_stack(n, k, d)
    layer = str(2 * n - 2)  # the last conv
    fx_trf, num = both(net, (1, 64, 64), layer)
    size = n * d * (k - 1) + 1  # DESIGN.md: TRF = n*d*(k-1) + 1
    half = (size - 1) // 2
    c = 32  # centre of the 64-wide output (stride 1, 'same' padding)
    assert fx_trf.size == (size, size)
    assert fx_trf.interval == ((c - half, c + half),) * 2
    assert fx_trf.clipped == ((c - half, c + half),) * 2
    assert fx_trf.stride == (1.0, 1.0)
    assert fx_trf.centre == (32.0, 32.0)
    assert fx_trf.output_centre == (32, 32)
    assert fx_trf.output_shape == (64, 64) and fx_trf.input_shape == (64, 64)
    assert fx_trf.global_dims == (False, False) and not fx_trf.is_global
    assert fx_trf.local and fx_trf.method == "fx"
    # the numeric surrogate sees the same support
    assert num.method == "numeric"
    assert num.clipped == fx_trf.clipped and num.size == fx_trf.size
    assert num.stride == (1.0, 1.0)


def test_clipped_hull_small_input() -> None:
    # 4 convs 3x3 (pad 1) on 6x6: centre unit 3 sees [3-4, 3+4] = [-1, 7]; in bounds [0, 5].
    fx_trf, num = both(conv_stack(4, 3), (1, 6, 6), "6")
    assert fx_trf.interval == ((-1, 7), (-1, 7))
    assert fx_trf.size == (9, 9)
    assert fx_trf.clipped == ((0, 5), (0, 5))
    assert num.clipped == ((0, 5), (0, 5))
    assert fx_trf.centre == (3.0, 3.0)


def test_clipped_hull_is_exact_with_dilation() -> None:
    # k=3, dilation 3, padding 3 on a 4-wide input: centre unit 2 reads 2-3+3t = -1, 2, 5.
    # Only index 2 is in bounds, so the exact hull is [2, 2] (not [-1, 5] ∩ [0, 3] = [0, 3]).
    net = nn.Sequential(nn.Conv1d(1, 1, 3, dilation=3, padding=3))
    fx_trf, num = both(net, (1, 4), "0")
    assert fx_trf.interval == ((-1, 5),)
    assert fx_trf.size == (7,)
    assert fx_trf.clipped == ((2, 2),)
    assert num.clipped == ((2, 2),)


# ----------------------------------------------------------------------------- strides, pools


def test_stride_and_pool_chain_recurrence() -> None:
    # ResNet-like stem + two 3x3 convs on 64x64.
    layers = [  # (kernel, stride, padding)
        (7, 2, 3),  # conv1
        (3, 2, 1),  # maxpool
        (3, 1, 1),  # conv
        (3, 1, 1),  # conv
    ]
    net = nn.Sequential(
        nn.Conv2d(3, 4, 7, stride=2, padding=3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
    )
    # forward recurrence: r_out = r_in + (k-1)*j_in, j_out = j_in*s
    r, j = 1, 1
    for k, s, _p in layers:
        r, j = r + (k - 1) * j, j * s
    assert (r, j) == (27, 4)
    # backward interval of the centre unit: output 64 -> 32 -> 16, c' = 8;
    # [a, b] at a layer's output comes from [a*s - p, b*s - p + (k-1)] at its input.
    a = b = 8
    for k, s, p in reversed(layers):
        a, b = a * s - p, b * s - p + (k - 1)
    assert (a, b) == (19, 45)  # by hand: [6,10] -> [11,21] -> [19,45]
    fx_trf, num = both(net, (3, 64, 64), "6")
    assert fx_trf.size == (27, 27)
    assert fx_trf.stride == (4.0, 4.0)
    assert fx_trf.interval == ((19, 45), (19, 45))
    assert fx_trf.centre == (32.0, 32.0)
    assert fx_trf.local
    assert num.clipped == fx_trf.clipped and num.stride == fx_trf.stride


def test_stride2_even_input_lower_right_centre() -> None:
    # 8 -> 4 outputs; c' = 4 // 2 = 2 (lower-right of the two central units 1, 2).
    net = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.Conv2d(1, 1, 2, stride=2))
    t = theoretical_rf(net, (1, 8, 8), ["0"])["0"]
    assert t.output_centre == (2, 2)
    assert t.interval == ((3, 5), (3, 5))  # [2*2-1, 2*2-1+2]
    assert t.centre == (4.0, 4.0)
    # non-overlapping 2x2 stride 2 on 8: unit 2 sees [4, 5], centre 4.5
    net2 = nn.Sequential(nn.Conv2d(1, 1, 2, stride=2))
    t2 = theoretical_rf(net2, (1, 8, 6), "0")["0"]
    assert t2.output_shape == (4, 3) and t2.output_centre == (2, 1)
    assert t2.interval == ((4, 5), (2, 3))
    assert t2.centre == (4.5, 2.5)
    assert t2.size == (2, 2) and t2.stride == (2.0, 2.0)


def test_pool_ceil_mode_and_dilation() -> None:
    # MaxPool k=3 s=2 dilation 2 pad 1 on 10: (10 + 2 - 5) / 2 = 3.5 -> ceil 4 (+1) = 5 outputs
    net = nn.Sequential(nn.MaxPool1d(3, stride=2, padding=1, dilation=2, ceil_mode=True))
    fx_trf, num = both(net, (1, 10), "0")
    assert fx_trf.output_shape == (5,)
    # c' = 2 reads 2*2 - 1 + 2t = 3, 5, 7
    assert fx_trf.interval == ((3, 7),)
    assert fx_trf.stride == (2.0,)
    assert num.clipped == ((3, 7),)  # max pooling -> average pooling in the surrogate


def test_transposed_conv() -> None:
    # ConvTranspose k=4 s=2 p=1 on 8 -> 16; unit o=8 receives input i where o = 2i - 1 + t:
    # t=1 -> i=4, t=3 -> i=3. So [3, 4], stride 1/2.
    net = nn.Sequential(nn.ConvTranspose2d(1, 1, 4, stride=2, padding=1))
    fx_trf, num = both(net, (1, 8, 8), "0")
    assert fx_trf.output_shape == (16, 16)
    assert fx_trf.interval == ((3, 4), (3, 4))
    assert fx_trf.stride == (0.5, 0.5)
    assert not fx_trf.local
    assert num.clipped == fx_trf.clipped


def test_upsample_nearest_then_conv() -> None:
    # nearest x2: out o reads floor(o/2). Centre 8 -> 4. After a 3x3 conv: [7, 9] -> [3, 4].
    net = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(1, 1, 3, padding=1))
    up = theoretical_rf(net, (1, 8, 8), ["0", "1"])
    assert up["0"].interval == ((4, 4), (4, 4)) and up["0"].stride == (0.5, 0.5)
    assert up["1"].interval == ((3, 4), (3, 4)) and up["1"].size == (2, 2)
    assert not up["1"].local
    assert theoretical_rf(net, (1, 8, 8), "1", method="numeric")["1"].clipped == ((3, 4),) * 2


class _GuardedForward(nn.Module):
    """Wraps its layers in ``try/except Exception`` and re-raises any error as its own, as some
    models do: erf-monitor's signal that stops the forward early must pass through."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 1, 3, padding=1)
        self.b = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.b(self.a(x))
        except Exception as exc:
            raise RuntimeError("guarded forward failed") from exc


@pytest.mark.parametrize("method", ["numeric", "fx", "auto"])
def test_model_catching_exception_does_not_swallow_the_stop(method: str) -> None:
    # Stopping after "a" (the last wanted layer) must not surface as the model's own error.
    trf = theoretical_rf(_GuardedForward(), (1, 9, 9), ["a"], method=method)["a"]
    assert trf.interval == ((3, 5), (3, 5)) and trf.size == (3, 3)


def test_bilinear_align_corners() -> None:
    # align_corners=False, x2 on 8: src(8) = 8.5/2 - 0.5 = 3.75 -> taps 3, 4
    net = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
    fx_trf, num = both(net, (1, 8, 8), "0")
    assert fx_trf.interval == ((3, 4), (3, 4)) and num.clipped == fx_trf.clipped

    # align_corners=True, 5 -> 9: src(o) = o * 4/8; the centre o=4 lands exactly on 2:
    # the neighbour tap has weight 0 and cannot influence the unit.
    class Interp(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, size=(9, 9), mode="bilinear", align_corners=True)

    net2 = nn.Sequential(Interp())
    fx2, num2 = both(net2, (1, 5, 5), "0")
    assert fx2.interval == ((2, 2), (2, 2)) and fx2.stride == (0.5, 0.5)
    assert num2.clipped == ((2, 2), (2, 2))


def test_adaptive_pool_windows_and_global() -> None:
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.AdaptiveAvgPool2d(3))
    t = theoretical_rf(net, (1, 8, 8), "1")["1"]
    # window i: floor(i*8/3) .. ceil((i+1)*8/3) - 1; centre i=1: 2 .. 5
    assert t.interval == ((2, 5), (2, 5))
    assert t.stride == pytest.approx((8 / 3, 8 / 3))
    assert not t.local and not t.is_global
    g = theoretical_rf(nn.Sequential(nn.AdaptiveMaxPool2d(1)), (1, 8, 6), "0")["0"]
    assert g.global_dims == (True, True)
    assert g.size == (math.inf, math.inf)
    assert g.interval == ((-math.inf, math.inf),) * 2
    assert g.clipped == ((0, 7), (0, 5))
    assert g.centre == (3.5, 2.5)  # (0 + 0.5) * S / 1 - 0.5


# ----------------------------------------------------------------------------- branches


class Residual(nn.Module):
    def __init__(self, main: nn.Module, skip: nn.Module) -> None:
        super().__init__()
        self.main, self.skip = main, skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.skip(x)


def test_residual_union_wider_skip() -> None:
    net = nn.Sequential(Residual(nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 5, padding=2)))
    fx_trf, num = both(net, (1, 16, 16), "0")
    assert fx_trf.interval == ((6, 10), (6, 10))  # the 5x5 skip wins
    assert num.clipped == fx_trf.clipped


def test_residual_union_narrower_skip_and_asymmetric_paths() -> None:
    main = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 1, 3, padding=1))
    t = theoretical_rf(nn.Sequential(Residual(main, nn.Identity())), (1, 16, 16), "0")["0"]
    assert t.interval == ((6, 10), (6, 10))

    class Shifted(nn.Module):  # pad left/top by 1 then 2x2 valid conv: unit o sees [o-1, o]
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(F.pad(x, (1, 0, 1, 0)))

    net = nn.Sequential(Residual(Shifted(), nn.Identity()))
    fx_trf, num = both(net, (1, 8, 8), "0")
    assert fx_trf.interval == ((3, 4), (3, 4))  # [4-1, 4] ∪ [4, 4]
    assert fx_trf.centre == (3.5, 3.5)
    assert fx_trf.local
    assert num.clipped == fx_trf.clipped


class Inception(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(c, 2, 1)
        self.b3 = nn.Sequential(nn.Conv2d(c, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))
        self.b5 = nn.Conv2d(c, 2, 5, padding=2)
        self.bp = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.Conv2d(c, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], dim=1)


def test_inception_concat() -> None:
    net = nn.Sequential(Inception(1), Inception(8))
    res = theoretical_rf(net, (1, 32, 32), ["0", "1"])
    assert res["0"].interval == ((14, 18), (14, 18))  # widest branch 5x5
    assert res["1"].interval == ((12, 20), (12, 20))  # 5 + 5 - 1 = 9
    assert res["1"].local
    num = theoretical_rf(net, (1, 32, 32), ["1"], method="numeric")["1"]
    assert num.clipped == res["1"].clipped


# ----------------------------------------------------------------------------- global ops


class SE(nn.Module):
    def __init__(self, c: int, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True) if self.functional else self.pool(x)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


@pytest.mark.parametrize("functional", [False, True])
def test_squeeze_excitation_is_global(functional: bool) -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), SE(4, functional))
    fx_trf, num = both(net, (1, 12, 10), "1")
    assert fx_trf.global_dims == (True, True) and fx_trf.is_global
    assert fx_trf.size == (math.inf, math.inf)
    assert fx_trf.interval == ((-math.inf, math.inf),) * 2
    assert fx_trf.clipped == ((0, 11), (0, 9))
    assert fx_trf.stride == (1.0, 1.0)
    assert not fx_trf.local
    assert fx_trf.centre == (6.0, 5.0)  # (c' + 0.5) * S / S' - 0.5 with S' = S
    assert num.global_dims == (True, True) and num.clipped == fx_trf.clipped
    assert str(fx_trf).startswith("TRF(global x global")


def test_flatten_linear_is_global_with_exact_hull() -> None:
    # 1x1 conv stride 2 on 8 reads 0, 2, 4, 6 only: the hull of everything is [0, 6].
    net = nn.Sequential(nn.Conv2d(1, 2, 1, stride=2), nn.Flatten(), nn.Linear(32, 3))
    fx_trf, num = both(net, (1, 8, 8), "2")
    assert fx_trf.output_shape == () and fx_trf.output_centre == ()
    assert fx_trf.global_dims == (True, True)
    assert fx_trf.clipped == ((0, 6), (0, 6))
    assert fx_trf.centre == (3.5, 3.5)
    assert num.global_dims == (True, True) and num.clipped == ((0, 6), (0, 6))


def test_token_attention_is_global() -> None:
    class TinyViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 8, 4, stride=4)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.mlp = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.patch(x).flatten(2).transpose(1, 2)  # (N, L, D)
            t = t + self.attn(t, t, t)[0]
            return self.mlp(t)

    res = theoretical_rf(TinyViT(), (3, 16, 16), ["patch", "mlp"], method="fx")
    assert res["patch"].interval == ((8, 11), (8, 11)) and res["patch"].stride == (4.0, 4.0)
    assert res["mlp"].global_dims == (True, True)
    # The token output is put on its 4 x 4 patch grid (no prefix tokens; inferred from shapes).
    assert res["mlp"].output_shape == (4, 4) and res["mlp"].output_centre == (2, 2)


def test_functional_ops_chunk_cat_interpolate_slice() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(2, 4, 3, padding=1)
            self.d = nn.Conv2d(2, 2, 3, padding=2, dilation=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.max_pool2d(self.c(x), 3, 2, 1)  # 16 -> 8
            a, b = y.chunk(2, dim=1)
            z = F.interpolate(torch.cat([a, self.d(b)], 1), scale_factor=2)  # 8 -> 16
            return z[:, :, 1:, :]  # (15, 16)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    fx_trf, num = both(Wrap(), (2, 16, 16), "net")
    # centre (7, 8) -> rows: sliced 7 -> 8 -> nearest 4; cols: 8 -> 4.
    # branch a: pool k3 s2 p1 [7, 9] -> conv [6, 10]; branch d: [2, 6] -> [3, 13] -> [2, 14].
    assert fx_trf.output_centre == (7, 8)
    assert fx_trf.interval == ((2, 14), (2, 14))
    assert fx_trf.stride == (1.0, 1.0)  # 2 (pool) * 1/2 (nearest x2)
    assert not fx_trf.local
    assert num.clipped == fx_trf.clipped


def test_group_norm_is_global() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4))
    fx_trf, num = both(net, (1, 10, 10), "1")
    assert fx_trf.global_dims == (True, True) and num.global_dims == (True, True)


def test_conv1d_and_conv3d_stacks() -> None:
    t1 = theoretical_rf(conv_stack(3, 5, dims=1), (1, 40), "4")["4"]
    assert t1.size == (13,) and t1.interval == ((14, 26),)  # 3*(5-1)+1, centre 20
    net3 = conv_stack(2, 3, dims=3)
    fx3, num3 = both(net3, (1, 12, 10, 8), "2")
    assert fx3.output_centre == (6, 5, 4)
    assert fx3.interval == ((4, 8), (3, 7), (2, 6))
    assert num3.clipped == fx3.clipped


def test_first_call_of_a_shared_module() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x))

    for method in ("fx", "numeric"):
        t = theoretical_rf(Twice(), (1, 16, 16), "conv", method=method)["conv"]
        assert t.clipped == ((7, 9), (7, 9)), method  # 3, not 5


# ----------------------------------------------------------------------------- API behaviour


def test_errors() -> None:
    net = nn.Sequential(conv_stack(2, 3), nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match=r"'0\.2'"):
        theoretical_rf(net, (1, 8, 8), "0.22")
    with pytest.raises(ValueError, match="no spatial dims"):
        theoretical_rf(net, (1,), "0")

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    for method in ("fx", "numeric", "auto"):
        with pytest.raises(ValueError, match="never called"):
            theoretical_rf(Unused(), (1, 8, 8), "spare", method=method)


def test_fallback_to_numeric_with_one_warning() -> None:
    class Summed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(torch.cumsum(x, dim=2))  # no fx rule

    with pytest.raises(ValueError, match="cumsum"):
        theoretical_rf(Summed(), (1, 8, 8), "conv", method="fx")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t = theoretical_rf(Summed(), (1, 8, 8), ["conv"])["conv"]
    msgs = [str(w.message) for w in rec if issubclass(w.category, ERFProbeWarning)]
    assert len(msgs) == 1 and "cumsum" in msgs[0]
    assert t.method == "numeric"
    assert t.clipped == ((0, 5), (3, 5))  # rows 3..5 of the running sum read rows 0..5


def test_batch_shape_compile_forward_fn_and_state_untouched() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.MaxPool2d(2))
    net.train()
    net[1].eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    a = theoretical_rf(net, (5, 3, 16, 16), "2")["2"]  # (N, C, H, W) accepted
    b = theoretical_rf(torch.compile(net), (3, 16, 16), ["_orig_mod.2"])["_orig_mod.2"]
    c = theoretical_rf(torch.compile(net), (3, 16, 16), ["2"], method="numeric")["2"]
    assert a.interval == b.interval == ((7, 10), (7, 10))  # pool unit 4 -> [8, 9] -> [7, 10]
    assert c.clipped == a.clipped
    assert [m.training for m in net.modules()] == [True, True, False, True]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())

    class DictIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = conv_stack(2, 3)

        def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.body(batch["image"])

    for method in ("fx", "numeric"):
        t = theoretical_rf(
            DictIn(), (1, 8, 8), "body.2", method=method, forward_fn=lambda m, x: m({"image": x})
        )["body.2"]
        assert t.clipped == ((2, 6), (2, 6))


# ----------------------------------------------------------------------------- torchvision

tv = pytest.importorskip("torchvision")


def test_resnet18_published_trf_sizes() -> None:
    # Hand derivation at 224: stem conv 7/2 -> r=7, j=2; maxpool 3/2 -> r=11, j=4;
    # layer1: 4 convs 3x3 at j=4 -> 11 + 4*2*4 = 43; layer2: 4 convs at j=4 (first, stride 2)
    # then j=8 -> 43 + 8 + 3*16 = 99; layer3: 99 + 16 + 3*32 = 211; layer4: 211 + 32 + 3*64 = 435.
    net = tv.models.resnet18()
    res = theoretical_rf(net, (3, 224, 224), ["layer1", "layer2", "layer3", "layer4", "fc"])
    assert [res[k].size[0] for k in ("layer1", "layer2", "layer3", "layer4")] == [43, 99, 211, 435]
    assert [res[k].stride[0] for k in ("layer1", "layer2", "layer3", "layer4")] == [4, 8, 16, 32]
    # layer1 (56x56, c'=28): [28-4, 28+4] at the pool output -> [47, 65] -> [91, 133]
    assert res["layer1"].interval == ((91, 133), (91, 133))
    assert res["layer4"].clipped == ((0, 223), (0, 223))
    assert res["layer4"].local
    assert res["fc"].global_dims == (True, True) and not res["fc"].local


@pytest.mark.slow
def test_resnet50_published_trf_sizes() -> None:
    # Bottleneck blocks have one 3x3 conv (torchvision puts the stride there):
    # layer1: 11 + 3*2*4 = 35; layer2: 35 + 2*4 + 3*2*8 = 91; layer3: 91 + 2*8 + 5*2*16 = 267;
    # layer4: 267 + 2*16 + 2*2*32 = 427 (the published ResNet-50 numbers).
    net = tv.models.resnet50()
    res = theoretical_rf(net, (3, 224, 224), ["layer1", "layer2", "layer3", "layer4"], method="fx")
    assert [r.size[0] for r in res.values()] == [35, 91, 267, 427]


_MODELS = {
    "resnet18": (lambda: tv.models.resnet18(), ["layer1", "layer2"], 96),
    "vgg11": (lambda: tv.models.vgg11(), ["features.5", "features.10"], 48),
    "alexnet": (lambda: tv.models.alexnet(), ["features.2", "features.5"], 96),
    "mobilenet_v2": (lambda: tv.models.mobilenet_v2(), ["features.2", "features.4"], 64),
    "mobilenet_v3_small": (lambda: tv.models.mobilenet_v3_small(), ["features.1"], 64),
    "efficientnet_b0": (lambda: tv.models.efficientnet_b0(), ["features.2"], 64),
    "densenet121": (
        lambda: tv.models.densenet121(),
        ["features.pool0", "features.denseblock1"],
        64,
    ),
    "googlenet": (
        lambda: tv.models.googlenet(aux_logits=False, init_weights=False),
        ["maxpool1", "inception3a"],
        96,
    ),
    "convnext_tiny": (lambda: tv.models.convnext_tiny(), ["features.0", "features.1"], 96),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_MODELS))
def test_fx_agrees_with_numeric_on_torchvision(name: str) -> None:
    ctor, layers, px = _MODELS[name]
    net = ctor()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ERFProbeWarning)  # the fx path must handle these models
        fx_res = theoretical_rf(net, (3, px, px), layers, method="fx")
    num_res = theoretical_rf(net, (3, px, px), layers, method="numeric")
    for layer in layers:
        a, b = fx_res[layer], num_res[layer]
        assert a.clipped == b.clipped, layer
        for d in range(2):
            whole = a.clipped[d] == (0, px - 1)
            if not whole:  # where the field is smaller than the input, numeric can tell
                assert a.global_dims[d] == b.global_dims[d], layer
            lo, hi = a.interval[d]
            if not a.global_dims[d] and lo > 0 and lo + a.stride[d] > 0 and hi < px - 1:
                assert a.stride[d] == b.stride[d], layer


def test_compiled_submodule_is_traced_analytically() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    )
    net[1] = torch.compile(net[1])  # never run; fx must trace the eager module behind it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numeric fallback warning
        trf = theoretical_rf(net, (3, 16, 16), ["1", "1._orig_mod.0"])
    assert trf["1"].method == "fx" and trf["1"].size == (5.0, 5.0)
    assert trf["1._orig_mod.0"].size == (5.0, 5.0)


# ----------------------------------------------------------------------------- data-dependent


class Deformable(nn.Module):
    """torchvision's DeformConv2d: offsets predicted from the input, or fixed (a parameter)."""

    def __init__(self, predicted: bool = True) -> None:
        super().__init__()
        from torchvision.ops import DeformConv2d

        self.predicted = predicted
        self.offsets = nn.Conv2d(3, 2 * 3 * 3, 3, padding=1)
        self.fixed = nn.Parameter(torch.full((1, 18, 16, 16), 0.0))
        self.dc = DeformConv2d(3, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        off = self.offsets(x) if self.predicted else self.fixed.expand(x.shape[0], -1, -1, -1)
        return self.out(self.dc(x, off))


class GridSampler(nn.Module):
    def __init__(self, predicted: bool = True) -> None:
        super().__init__()
        self.predicted = predicted
        self.loc = nn.Conv2d(3, 2, 3, padding=1)
        self.out = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.predicted:
            grid = torch.tanh(self.loc(x)).permute(0, 2, 3, 1)
        else:  # a fixed grid: the identity warp, shifted by 1 / 8
            theta = x.new_tensor([[[1.0, 0.0, 0.125], [0.0, 1.0, 0.0]]]).expand(x.shape[0], -1, -1)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return self.out(F.grid_sample(x, grid, align_corners=False))


class PredictedBoxes(nn.Module):
    """RoI-align of a box regressed from the image (a detection head's pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.reg = nn.Linear(3, 4)
        self.out = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xy = torch.sigmoid(self.reg(x.mean((2, 3)))) * 16.0  # a box inside the 16 x 16 input
        sample = torch.arange(x.shape[0], dtype=x.dtype, device=x.device)[:, None]
        boxes = torch.cat([sample, xy], dim=1)
        return self.out(roi_align(x, boxes, output_size=4, aligned=True))


class ComputedGather(nn.Module):
    """Rows picked by an argmax over the image: indices computed from the data."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.out = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.conv(x).mean((1, 3)).argmax(1)  # (N,)
        index = rows[:, None, None, None].expand(-1, x.shape[1], 1, x.shape[3])
        return self.out(torch.gather(x, 2, index))


@pytest.mark.parametrize(
    ("model", "layer", "op", "methods"),
    [
        (Deformable, "out", "deform_conv2d", ("fx", "numeric")),
        (GridSampler, "out", "grid_sample", ("fx", "numeric")),
        (PredictedBoxes, "out", "roi_align", ("fx", "numeric")),
        (ComputedGather, "out", "gather", ("numeric",)),
    ],
)
def test_data_dependent_sampling_has_no_finite_trf(
    model: type[nn.Module], layer: str, op: str, methods: tuple[str, ...]
) -> None:
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = model()
    for method in (*methods, "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ERFProbeWarning)  # auto: gather has no fx rule
            trf = theoretical_rf(net, (3, 16, 16), [layer], method=method)[layer]  # type: ignore[arg-type]
        assert trf.data_dependent and trf.is_global, (method, trf)
        assert op in trf.reason and op in str(trf) and "data-dependent" in str(trf)
        assert trf.size == (math.inf, math.inf)
        assert trf.interval == ((-math.inf, math.inf),) * 2
        assert not trf.local


def test_fixed_sampling_positions_are_not_data_dependent() -> None:
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ERFProbeWarning)  # no fx rule: the numeric method
        dc = theoretical_rf(Deformable(predicted=False), (3, 16, 16), ["out"])["out"]
        gs = theoretical_rf(GridSampler(predicted=False), (3, 16, 16), ["out"])["out"]
    # Fixed offsets: the numeric method measures the 3 x 3 kernel's taps, moved by the
    # (small, positive) offsets its surrogate gives the offset parameter: at most one more.
    assert not dc.data_dependent and not dc.is_global
    assert dc.clipped[0][0] <= 7 and dc.clipped[0][1] >= 9 and max(dc.size) <= 4
    # The fixed grid reads at most 2 neighbouring pixels per axis.
    assert not gs.data_dependent and not gs.is_global and max(gs.size) <= 2
    # Layers before the sampling op keep their finite field.
    off = theoretical_rf(Deformable(), (3, 16, 16), ["offsets"])["offsets"]
    assert not off.data_dependent and off.size == (3.0, 3.0)


def test_numeric_method_survives_a_model_the_dependence_tracker_cannot_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import erf_monitor.trf.numeric as trf_module

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("this op has no dispatch-mode support")

    monkeypatch.setattr(trf_module._DataDependence, "__torch_dispatch__", refuse)
    trf = theoretical_rf(conv_stack(2, 3), (1, 16, 16), ["2"], method="numeric")["2"]
    assert trf.size == (5.0, 5.0) and not trf.data_dependent


def test_no_op_is_given_two_rules() -> None:
    # The rule tables are built at import, where a second, different rule for an op raises
    # (before, 16 ops were listed as pointwise and unary, the later silently winning).
    from erf_monitor.trf import fx, rules

    methods, functions = dict(rules.METHOD_RULES), dict(rules.FUNCTION_RULES)
    try:
        with pytest.raises(ValueError, match="two rules"):
            rules.register_method(fx._pointwise, "dropout")
        with pytest.raises(ValueError, match="two rules"):
            rules.register_function(fx._pointwise, "dropout", namespaces=(F,))
        rules.register_method(fx._unary, "dropout")  # the same rule again is no conflict
    finally:
        rules.METHOD_RULES.update(methods)
        rules.FUNCTION_RULES.update(functions)
    assert rules.METHOD_RULES["dropout"] is rules.FUNCTION_RULES[F.dropout] is fx._unary


def test_op_rule_decorator_refuses_a_second_rule_for_an_op() -> None:
    # Each op keyword of the decorator: the op keeps its first rule, the second one raises;
    # the same rule decorated again (stacked) is no conflict.
    from erf_monitor.trf import fx, rules

    tables = (
        rules.MODULE_RULES,
        rules.FUNCTION_RULES,
        rules.METHOD_RULES,
        rules.NAMED_FUNCTION_RULES,
    )
    saved = [dict(t) for t in tables]

    def other(ctx: object, node: object, reg: object) -> list[object]:
        return []

    try:
        for ops in (
            {"modules": (nn.Linear,)},
            {"functions": ("conv2d",), "namespaces": (F,)},
            {"methods": ("roll",)},
            {"named": ("torchvision.ops.stochastic_depth.stochastic_depth",)},
        ):
            with pytest.raises(ValueError, match="two rules"):
                rules.op_rule(**ops)(other)  # type: ignore[arg-type]
        assert rules.op_rule(methods=("roll",))(fx._roll) is fx._roll
        rules.op_rule(named=("my_pkg.ops.my_op",))(other)
        rules.op_rule(methods=("my_op",))(rules.op_rule(named=("my_pkg.ops.my_op",))(other))
        assert rules.NAMED_FUNCTION_RULES["my_pkg.ops.my_op"] is rules.METHOD_RULES["my_op"]
        with pytest.raises(ValueError, match="two rules"):
            rules.op_rule(named=("my_pkg.ops.my_op",))(fx._unary)
    finally:
        for t, before in zip(tables, saved):
            t.clear()
            t.update(before)
    assert rules.MODULE_RULES[nn.Linear] is fx._linear
    assert rules.METHOD_RULES["roll"] is fx._roll and "my_op" not in rules.METHOD_RULES


def test_trf_text_is_written_in_one_place() -> None:
    # One dim 7 px wide (stride 2), the other global: what str(), the CLI's table and the
    # pictures print.
    from erf_monitor import TRF

    trf = TRF(
        size=(7.0, math.inf), stride=(2.0, 1.0), interval=((3, 9), (-math.inf, math.inf)),
        clipped=((3, 9), (0, 15)), global_dims=(False, True), centre=(6.0, 7.5),
        output_centre=(3, 0), output_shape=(8, 1), input_shape=(16, 16), method="fx",
    )  # fmt: skip
    assert str(trf) == "TRF(7 x global, stride 2 x 1)"
    assert (trf.size_text(), trf.clipped_text(), trf.clipped_text("×")) == (
        "7 x global", "7 x 16", "7×16",
    )  # fmt: skip


def test_trf_short_text_names_the_kind_of_field() -> None:
    # The table cell and the panel title read the field from one method.
    from erf_monitor import TRF

    common: dict[str, Any] = dict(
        stride=(1.0, 1.0), centre=(4.0, 4.0), output_centre=(4, 4), output_shape=(9, 9),
        input_shape=(9, 9), method="fx",
    )  # fmt: skip
    finite = TRF(size=(3.0, 5.0), interval=((3, 5), (2, 6)), clipped=((3, 5), (2, 6)),
                 global_dims=(False, False), **common)  # fmt: skip
    glob = TRF(size=(3.0, math.inf), interval=((3, 5), (-math.inf, math.inf)),
               clipped=((3, 5), (0, 8)), global_dims=(False, True), **common)  # fmt: skip
    dependent = TRF(size=(math.inf, math.inf), interval=((-math.inf, math.inf),) * 2,
                    clipped=((0, 8), (0, 8)), global_dims=(True, True), data_dependent=True,
                    **common)  # fmt: skip
    assert finite.short_text() == "3 x 5"
    assert glob.short_text("×") == "global (3×9)"
    assert dependent.short_text() == "data-dependent"
