"""``layers="auto"`` on small models built to test one rule each (the zoo test covers real ones)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import erf_monitor as em
from erf_monitor.targets.auto import pick_layers


class ChannelsLast(nn.Module):
    """A Swin-like stage: conv patch embedding, then blocks on (N, H, W, C) maps."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, c, 4, stride=4)
        self.mix = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.mlp = nn.Linear(c, c)
        self.merge = nn.Linear(4 * c, 2 * c)  # patch merging: 2x2 tokens -> one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.embed(x)
        y = self.mix(y).permute(0, 2, 3, 1)  # (N, H, W, C)
        y = y + self.mlp(y)
        n, h, w, c = y.shape
        y = y.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        return self.merge(y.reshape(n, h // 2, w // 2, 4 * c))


def test_channels_last_stages_are_read_as_such() -> None:
    torch.manual_seed(0)
    net = ChannelsLast()
    x = torch.randn(2, 3, 32, 32)
    pick = pick_layers(net, x)
    assert pick.names == ["mlp", "merge"]  # "mix" (8x8 too) finishes before "mlp"
    # (N, 8, 8, 6) is not (N, C=8, 8, 6): the reading puts it on the 8x8 patch grid.
    assert set(pick.layouts) == {"mlp", "merge"}
    res = em.compute_erf(net, x, "auto")
    assert res["mlp"].output_shape == (8, 8) and res["merge"].output_shape == (4, 4)
    # Reference: the centre token of merge (2, 2), all channels, by hand.
    maps = []
    for i in range(2):
        xi = x[i : i + 1].clone().requires_grad_(True)
        out = net(xi)
        (g,) = torch.autograd.grad(out[0, 2, 2, :].sum(), xi)
        maps.append(g.abs().sum(1)[0])
    torch.testing.assert_close(res["merge"].heatmap, torch.stack(maps).mean(0))


def test_cube_shapes_take_their_inputs_layout() -> None:
    # (N, 8, 8, 8) reads both ways; after a conv (N, C, H, W) the ReLU keeps that layout.
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
    assert pick_layers(net, torch.randn(1, 3, 16, 16)).names == ["1"]


def test_layer_norms_and_their_views_are_never_picked() -> None:
    class Norm2d(nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class Stem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 4, stride=4)
            self.norm = Norm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x)).contiguous()  # a view (or copy) of a LN output

    net = nn.Sequential(Stem(), nn.Conv2d(8, 8, 3, padding=1), nn.GELU(), Norm2d(8))
    names = pick_layers(net, torch.randn(1, 3, 32, 32)).names
    assert names == ["2"]  # not "0" (ends with a norm), not "0.norm", not "3"


def test_shared_modules_and_heads_are_not_picked() -> None:
    class Head(nn.Module):  # maps in, no map out: like an SSD/RetinaNet head
        def __init__(self) -> None:
            super().__init__()
            self.per_level = nn.ModuleList([nn.Conv2d(4, 2, 3, padding=1) for _ in range(2)])

        def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([c(f).flatten(2) for c, f in zip(self.per_level, feats)], 2)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)
            self.act = nn.ReLU()  # shared: called twice
            self.head = Head()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y1 = self.act(self.a(x))
            y2 = self.act(self.b(y1))
            return self.head([y1, y2])

    assert pick_layers(Net(), torch.randn(1, 3, 16, 16)).names == ["a", "b"]


def test_auto_refuses_models_without_maps() -> None:
    with pytest.raises(ValueError, match="name the layers explicitly"):
        pick_layers(nn.Sequential(nn.Flatten(), nn.Linear(48, 4)), torch.randn(1, 3, 4, 4))


class _NormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: a BatchNorm that holds its activation (and an Identity)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class _ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = _NormAct(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class _Down(nn.Module):
    """A RegNet bottleneck: conv on the old grid, stride-2 conv, a shortcut, relu(sum)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _ConvNormAct(cin, cout)
        self.conv2 = _ConvNormAct(cout, cout, stride=2)
        self.downsample = nn.Conv2d(cin, cout, 1, stride=2)
        self.act3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act3(self.conv2(self.conv1(x)) + self.downsample(x))


@pytest.mark.parametrize("px", [32, 48])
def test_block_entry_layers_with_a_norm_that_holds_its_activation_are_skipped(px: int) -> None:
    # Rule 3: conv1 runs on the old grid inside a block that changes it; at 48 px the
    # stage output is (N, 12, 12, 12), a cube that only the block's own convolution tells.
    net = nn.Sequential(_ConvNormAct(3, 8, stride=2), _Down(8, 12), _Down(12, 16))
    assert pick_layers(net, torch.randn(2, 3, px, px)).names == ["0", "1", "2"]


def test_timm_regnet_and_mobilevit_follow_rule_3() -> None:
    timm = pytest.importorskip("timm")
    x = torch.randn(2, 3, 96, 96)
    regnet = timm.create_model("regnetx_002", pretrained=False)
    # (was ['stem', 's2.b1.conv1', 's2', 's3', 's4'] at 96 px, s1.b1.conv1 ... at 64 px)
    assert pick_layers(regnet, x).names == ["stem", "s1", "s2", "s3", "s4"]
    mobilevit = timm.create_model("mobilevit_xxs", pretrained=False)
    names = ["stages.0", "stages.1", "stages.2", "stages.3", "final_conv"]
    assert pick_layers(mobilevit, x).names == names
