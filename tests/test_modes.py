"""Each ERF mode against a reference written here from the published protocol.

* RepLKNet (``erf/visualize_erf.py`` + ``erf/analyze_erf.py``, read in DingXiaoH/RepLKNet-pytorch):
  one image at a time, the model's output is the stage; seed = sum over channels of the relu
  of the centre unit ``(h // 2, w // 2)``; per-image map = relu of the input gradient summed
  over channels; a running average over images (an average meter); then
  ``log10(avg + 1)`` divided by its maximum; area ratios from the smallest centred odd square
  (sides 3, 5, 7, ... around ``(h // 2, w // 2)``) holding more than ``t`` of the mass.
* OpenERF (PyPI ``openerf``, Kim et al. BMVC 2023): one image at a time; seed = the channel
  mean of the centre activation: ``(h // 2, w // 2)`` for a ``(N, C, H, W)`` feature, for a
  token sequence the token ``P + int(T / 2) - ((T + 1) % 2) * (int(g / 2) + 1)`` (``T = g*g``
  patch tokens after ``P`` prefix tokens: the upper-left central token on even grids);
  per-image map = the input gradient averaged over channels, then clamped at 0; summed over
  images; divided by its total.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import erf_monitor as em
from erf_monitor.core.modes import DEFINITIONS, MODES


class _Stop(Exception):
    pass


def stage_output(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's output, the forward stopped there (their models return the stage)."""
    out: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: object, y: torch.Tensor) -> None:
        out.append(y)
        raise _Stop

    h = dict(model.named_modules())[layer].register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    return out[0]


class AverageMeter:
    def __init__(self) -> None:
        self.total: np.ndarray | float = 0.0
        self.count = 0

    def update(self, value: np.ndarray) -> None:
        self.total = self.total + value
        self.count += 1

    @property
    def avg(self) -> np.ndarray:
        return np.asarray(self.total) / self.count


def replknet_reference(model: nn.Module, layer: str, x: torch.Tensor) -> np.ndarray:
    model.eval()
    meter = AverageMeter()
    for i in range(x.shape[0]):
        sample = x[i : i + 1].clone().requires_grad_(True)
        y = stage_output(model, layer, sample)
        h, w = y.shape[2], y.shape[3]
        central = torch.relu(y[:, :, h // 2, w // 2]).sum()
        (grad,) = torch.autograd.grad(central, sample)
        meter.update(torch.relu(grad).sum((0, 1)).double().numpy())
    data = np.log10(meter.avg + 1)
    return data / data.max()


def replknet_area(data: np.ndarray, t: float) -> float | None:
    """Area ratio of the smallest odd square (side >= 3) centred at (h // 2, w // 2) holding
    more than ``t`` of the mass; None when no such square fits inside the map."""
    h, w = data.shape
    total = data.sum()
    cy, cx = h // 2, w // 2
    radius = 1
    while radius < h // 2:
        square = data[cy - radius : cy + radius + 1, cx - radius : cx + radius + 1]
        if square.sum() / total > t:
            side = 2 * radius + 1
            return side * side / (h * w)
        radius += 1
    return None


def openerf_token(num_patches: int) -> int:
    g = math.isqrt(num_patches)
    return int(num_patches / 2) - ((num_patches + 1) % 2) * (int(g / 2) + 1)


def openerf_reference(
    model: nn.Module, layer: str, x: torch.Tensor, prefix: int = 0
) -> torch.Tensor:
    model.eval()
    acc = torch.zeros(x.shape[2:], dtype=torch.float64)
    for i in range(x.shape[0]):
        sample = x[i : i + 1].clone().requires_grad_(True)
        y = stage_output(model, layer, sample)
        if y.dim() == 4:
            activation = y[0, :, y.shape[2] // 2, y.shape[3] // 2].mean()
        else:
            activation = y[0, prefix + openerf_token(y.shape[1] - prefix), :].mean()
        (grad,) = torch.autograd.grad(activation, sample)
        acc += grad.double().mean(dim=(0, 1)).clamp(min=0)
    return (acc / acc.sum()).float()


def luo_reference(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    total = torch.zeros(x.shape[2:], dtype=torch.float64)
    for i in range(x.shape[0]):
        sample = x[i : i + 1].clone().requires_grad_(True)
        y = stage_output(model, layer, sample)
        idx = tuple(s // 2 for s in y.shape[2:])
        (grad,) = torch.autograd.grad(y[(0, slice(None), *idx)].sum(), sample)
        total += grad[0].double().abs().sum(0)
    return (total / x.shape[0]).float()


# ----------------------------------------------------------------------------- models


def small_resnet() -> nn.Module:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return tv.models.resnet18()


class TinyViT(nn.Module):
    """timm-style attributes (``patch_embed.patch_size``, ``num_prefix_tokens``), 4 x 4 patches
    of 8 px on a 32 x 32 input: an even token grid."""

    num_prefix_tokens = 1

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, stride=8)
        self.patch_embed.patch_size = (8, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.tokens = nn.Identity()
        self.block = nn.TransformerEncoderLayer(
            dim, 2, 32, dropout=0.0, batch_first=True, norm_first=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = self.tokens(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), t], dim=1))
        return self.block(t)


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("crop", [False, "auto"])
def test_replknet_mode_is_their_pipeline(crop: bool | str) -> None:
    model = small_resnet()
    x = images(4, 64)
    r = em.compute_erf(model, x, ["layer3"], mode="replknet", crop=crop)["layer3"]  # type: ignore[arg-type]
    ref = replknet_reference(model, "layer3", x)
    np.testing.assert_allclose(r.heatmap.numpy(), ref, rtol=1e-4, atol=1e-6)
    assert r.centre_pixel == (32, 32)  # (h // 2, w // 2): their squares' centre, here the same
    for t in (0.2, 0.3, 0.5):
        expected = replknet_area(ref, t)
        assert expected is not None and r.area_ratio(t) == pytest.approx(expected)


def test_replknet_averages_before_the_log() -> None:
    """Summing instead of averaging changes every area ratio (log10(x + 1) is not scale-free):
    the map of N copies of one image is that image's map."""
    # float64: a batch of 4 runs other float32 kernels than a batch of 1 (noise of ~1e-7)
    model = small_resnet().double()
    one = images(1, 64).double()
    four = one.expand(4, -1, -1, -1).clone()
    kw: dict = {"mode": "replknet", "dtype": torch.float64}
    a = em.compute_erf(model, one, ["layer2"], **kw)["layer2"]
    b = em.compute_erf(model, four, ["layer2"], **kw)["layer2"]
    torch.testing.assert_close(a.heatmap, b.heatmap, rtol=1e-5, atol=1e-7)


def test_openerf_mode_on_a_cnn() -> None:
    model = small_resnet()
    x = images(3, 64, seed=2)
    res = em.compute_erf(model, x, ["layer2", "layer3"], mode="openerf")
    for name in ("layer2", "layer3"):
        r = res[name]
        torch.testing.assert_close(
            r.heatmap, openerf_reference(model, name, x), rtol=1e-4, atol=1e-7
        )
        assert float(r.heatmap.double().sum()) == pytest.approx(1.0)


def test_openerf_seeds_the_upper_left_central_token_of_an_even_grid() -> None:
    torch.manual_seed(0)
    model = TinyViT()
    x = images(2, 32, seed=3)
    res = em.compute_erf(model, x, ["tokens", "block"], mode="openerf")
    for name in ("tokens", "block"):
        ref = openerf_reference(model, name, x, prefix=1)
        torch.testing.assert_close(res[name].heatmap, ref, rtol=1e-4, atol=1e-7)
    # Before attention the token sees its own 8 x 8 patch: token (1, 1) of the 4 x 4 grid.
    tokens = res["tokens"]
    assert tokens.trf is not None and tokens.trf.output_centre == (1, 1)
    assert tokens.trf.clipped == ((8, 15), (8, 15))
    support = (tokens.heatmap > 0).nonzero()
    assert support.min(0).values.tolist() == [8, 8] and support.max(0).values.tolist() == [15, 15]
    assert tokens.centre_pixel == (12, 12)  # 11.5 rounded half up
    # Luo's mode seeds the lower-right one, token (2, 2): pixels 16..23.
    luo = em.compute_erf(model, x, ["tokens"])["tokens"]
    assert luo.trf is not None and luo.trf.clipped == ((16, 23), (16, 23))
    torch.testing.assert_close(luo.heatmap, luo_reference_tokens(model, x, 1 + 2 * 4 + 2))


def luo_reference_tokens(model: nn.Module, x: torch.Tensor, token: int) -> torch.Tensor:
    total = torch.zeros(x.shape[2:], dtype=torch.float64)
    for i in range(x.shape[0]):
        sample = x[i : i + 1].clone().requires_grad_(True)
        y = stage_output(model, "tokens", sample)
        (grad,) = torch.autograd.grad(y[0, token].sum(), sample)
        total += grad[0].double().abs().sum(0)
    return (total / x.shape[0]).float()


def test_luo_mode_against_its_reference() -> None:
    model = small_resnet()
    x = images(2, 48, seed=4)
    r = em.compute_erf(model, x, ["layer2"])["layer2"]
    torch.testing.assert_close(r.heatmap, luo_reference(model, "layer2", x), rtol=1e-4, atol=1e-7)


def test_a_trf_of_another_mode_is_not_used() -> None:
    torch.manual_seed(0)
    model = TinyViT()
    x = images(2, 32)
    luo_trf = em.theoretical_rf(model, (3, 32, 32), ["tokens"])
    with pytest.warns(em.ERFProbeWarning, match=r"seeds unit \(1, 1\)"):
        r = em.compute_erf(model, x, ["tokens"], mode="openerf", trf=luo_trf)["tokens"]
    assert r.trf is None
    assert r.theoretical_centre == (11.5, 11.5)  # still from the geometry of token (1, 1)


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="'luo', 'replknet', 'openerf'"):
        em.compute_erf(nn.Conv2d(1, 1, 3), torch.zeros(1, 1, 8, 8), ["weight"], mode="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        em.watch(nn.Conv2d(1, 1, 3), layers=["0"], mode="sum")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- recorded


def test_every_saved_result_records_its_mode(tmp_path: pytest.TempPathFactory) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from erf_monitor.cli import main

    out = tmp_path / "cli"  # type: ignore[operator]
    args = ["analyze", "torchvision:resnet18", "--layers", "layer1", "--input-size", "32"]
    assert main([*args, "--samples", "2", "--mode", "openerf", "--out", str(out)]) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["mode"] == "openerf" and record["definition"] == DEFINITIONS["openerf"]
    with np.load(out / "maps.npz", allow_pickle=False) as maps:
        assert str(maps["__mode__"]) == "openerf"
        assert str(maps["__definition__"]) == DEFINITIONS["openerf"]
        assert maps["layer1"].shape == (32, 32)

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    writer = SummaryWriter(str(tmp_path / "tb"))  # type: ignore[operator]
    files = tmp_path / "files"  # type: ignore[operator]
    w = em.watch(
        net, layers=["2"], every_n_steps=1, logger=[writer, str(files)], mode="replknet",
        probe_inputs=images(2, 16), min_coverage=None,
    )  # fmt: skip
    w.step()
    w.close()
    writer.close()
    # The monitor's own run, beside the writer's (erf/ of its log directory).
    ea = EventAccumulator(str(tmp_path / "tb" / "erf"), size_guidance={"tensors": 0})  # type: ignore[operator]
    ea.Reload()
    texts = [t for t in ea.Tags()["tensors"] if t.startswith("erf/mode")]
    assert texts, ea.Tags()
    event = ea.Tensors(texts[0])[0]
    text = event.tensor_proto.string_val[0].decode()
    assert "mode=replknet" in text and DEFINITIONS["replknet"] in text
    with np.load(files / "erf_maps" / "step_1.npz", allow_pickle=False) as maps:
        assert str(maps["__mode__"]) == "replknet"
    assert (files / "events.log").read_text().count("mode=replknet") == 1


def test_definitions_are_documented() -> None:
    from pathlib import Path

    concepts = (Path(__file__).parents[1] / "docs" / "concepts.md").read_text()
    for mode in MODES:
        assert f'mode="{mode}"' in concepts
