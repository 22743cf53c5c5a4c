"""The probe's fast paths (cropping, batching, chunking, early exit) against plain computations.

Every comparison is against (a) the probe with ``crop=False`` and (b) a slow reference written
out below: one sample at a time, one layer at a time, a full forward of the whole model and
``torch.autograd.grad`` of the centre-unit seed. Models are probed at sizes where (most of)
their layers' TRFs are smaller than the input, so the cropped path is actually taken (checked
through the plan), and no fallback warning may be emitted.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pytest
import torch
import torchvision
from torch import nn

import erf_monitor as em
from erf_monitor.probe.crop import plan_groups

RTOL = 1e-4
# Absolute tolerance as a fraction of the map's maximum: float32 rounding. Both sides are
# float32 computations of the same float64 value, summed in different orders (crops, lean
# backwards): on resnet18 at 128 px the reference's own per-sample maps are 3.5e-7 of the
# maximum from a float64 run, the probe's 3.1e-7 (lean) and 3.9e-7 (autograd's kernels).
ATOL_REL = 1e-6

# ----------------------------------------------------------------------------- references


def reference_maps(
    model: nn.Module, x: torch.Tensor, layer: str, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample maps ``(N, *S)`` and the heatmap, computed the slow and obvious way."""
    model.eval()
    module = dict(model.named_modules())[layer]
    maps = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].detach().clone().requires_grad_(True)
        captured: list[torch.Tensor] = []
        # A clone, as the layer's output was when it ran: later in-place ops (ReLU(inplace),
        # ``out += identity``) must not change it.
        handle = module.register_forward_hook(
            lambda _m, _i, out, cap=captured: cap.append(out.clone()) if not cap else None
        )
        try:
            model(xi)  # the full forward, no early exit
        finally:
            handle.remove()
        out = captured[0]
        index: tuple[int | slice, ...] = (0, slice(None), *(s // 2 for s in out.shape[2:]))
        centre = out[index]
        if mode == "replknet":
            centre = torch.relu(centre)
        (grad,) = torch.autograd.grad(centre.sum(), xi)
        g = grad[0].clamp_min(0) if mode == "replknet" else grad[0].abs()
        maps.append(g.sum(0))
    per_sample = torch.stack(maps)
    if mode == "replknet":  # RepLKNet: the mean of the per-image maps, then log10(x + 1) / max
        mean = per_sample.double().mean(0)
        heat = (torch.log1p(mean) / torch.log1p(mean.max())).float()
    else:
        heat = per_sample.double().mean(0).float()
    return per_sample, heat


def close(actual: torch.Tensor | None, expected: torch.Tensor | None) -> None:
    assert actual is not None and expected is not None
    atol = ATOL_REL * float(expected.abs().max()) + 1e-30
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol)


def probe(model: nn.Module, x: torch.Tensor, layers: Sequence[str], **kw: object) -> em.ERFResults:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = em.compute_erf(model, x, list(layers), keep_per_sample=True, **kw)  # type: ignore[arg-type]
    fallback = [w for w in caught if "cropping" in str(w.message)]
    assert not fallback, [str(w.message) for w in fallback]
    return res


def cropped_layers(model: nn.Module, shape: tuple[int, ...], layers: Sequence[str]) -> set[str]:
    trfs = em.theoretical_rf(model, shape, list(layers))
    units = {n: [t.output_centre] for n, t in trfs.items()}
    by_index = {n: {t.output_centre: t} for n, t in trfs.items()}
    groups = plan_groups(units, by_index, tuple(shape[1:]), True, False)
    return {n for g in groups if g.window is not None for n in g.layers}


def check_all(
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[str],
    modes: Sequence[str] = ("luo", "replknet"),
    min_cropped: int = 1,
) -> None:
    model.eval()
    cropped = cropped_layers(model, tuple(x.shape[1:]), layers)
    assert len(cropped) >= min_cropped, cropped
    trfs = em.theoretical_rf(model, tuple(x.shape[1:]), list(layers))
    for mode in modes:
        plain = probe(model, x, layers, mode=mode, crop=False, trf=trfs)
        fast = probe(model, x, layers, mode=mode, crop=True, trf=trfs)
        auto = probe(model, x, layers, mode=mode, crop="auto")
        for name in layers:
            ref_ps, ref_heat = reference_maps(model, x, name, mode)
            for res in (plain, fast, auto):
                r = res[name]
                assert r.per_sample is not None
                close(r.per_sample, ref_ps)
                close(r.heatmap, ref_heat)
            assert fast[name].output_shape == plain[name].output_shape
            assert fast[name].centre_pixel == plain[name].centre_pixel


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- models


class Custom(nn.Module):
    """Stride-2 convs, dilation, ceil_mode max-pool, BatchNorm, a rectangular strided conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.dil = nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU())
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.down = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.rect = nn.Conv2d(16, 16, (3, 5), stride=(1, 2), padding=(1, 2))
        self.dil2 = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.dil(self.stem(x)))
        return self.head(self.dil2(self.rect(self.down(x))))


class Tail(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the tail must never run")


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial eval statistics
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


# ----------------------------------------------------------------------------- tests


def test_resnet18_layers_cropped_equal_plain_and_reference() -> None:
    torch.manual_seed(0)
    model = seeded(torchvision.models.resnet18())
    check_all(model, randn(3, 3, 128, 128), ["layer1", "layer2", "layer3"], min_cropped=2)


def test_resnet18_96px_luo() -> None:
    torch.manual_seed(1)
    model = seeded(torchvision.models.resnet18(), 1)
    check_all(model, randn(3, 3, 96, 96, seed=1), ["layer1", "layer2"], modes=("luo",))


def test_vgg11_features() -> None:
    torch.manual_seed(0)
    model = seeded(torchvision.models.vgg11().features)
    layers = ["1", "2", "4", "5", "7", "10", "12"]
    check_all(model, randn(3, 3, 96, 96), layers, min_cropped=5)


def test_vgg11_features_in_full_model() -> None:
    torch.manual_seed(0)
    model = seeded(torchvision.models.vgg11())
    check_all(model, randn(2, 3, 80, 72), ["features.4", "features.9"], modes=("luo",))


def test_mobilenet_v2_features() -> None:
    torch.manual_seed(0)
    model = seeded(torchvision.models.mobilenet_v2())
    layers = ["features.1", "features.3", "features.5", "features.7"]
    check_all(model, randn(3, 3, 96, 96), layers, min_cropped=3)


@pytest.mark.parametrize("size", [(37, 45), (64, 64), (65, 65), (70, 51)])
def test_custom_dilation_ceil_mode_odd_even_sizes(size: tuple[int, int]) -> None:
    model = seeded(Custom())
    layers = ["stem", "dil", "pool", "down", "rect", "dil2"]
    check_all(model, randn(3, 3, *size), layers, min_cropped=3)


def test_chunking_and_batching_match_per_sample() -> None:
    model = seeded(torchvision.models.resnet18())
    x = randn(3, 3, 112, 112, seed=2)
    layers = ["layer1", "layer2"]
    assert cropped_layers(model, (3, 112, 112), layers) == set(layers)
    for mode in ("luo", "replknet"):
        whole = probe(model, x, layers, mode=mode)
        chunked = probe(model, x, layers, mode=mode, chunk_size=2)
        single = [probe(model, x[i : i + 1], layers, mode=mode) for i in range(3)]
        for name in layers:
            assert whole[name].per_sample is not None and chunked[name].per_sample is not None
            close(chunked[name].per_sample, whole[name].per_sample)
            close(chunked[name].heatmap, whole[name].heatmap)
            stacked = torch.cat([s[name].per_sample for s in single])  # type: ignore[misc]
            close(whole[name].per_sample, stacked)
            ref_ps, ref_heat = reference_maps(model, x, name, mode)
            close(chunked[name].per_sample, ref_ps)
            close(chunked[name].heatmap, ref_heat)


@pytest.mark.parametrize("crop", [False, True, "auto"])
def test_early_exit_never_runs_the_tail(crop: object) -> None:
    torch.manual_seed(0)
    body = [
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
    ]
    safe = nn.Sequential(*body).eval()
    raising = nn.Sequential(*body, Tail()).eval()
    x = randn(3, 3, 41, 40)
    layers = ["0", "2", "4"]
    with pytest.raises(RuntimeError, match="never run"):
        raising(x)
    trfs = em.theoretical_rf(safe, (3, 41, 40), layers)
    if crop is not False:
        assert cropped_layers(safe, (3, 41, 40), layers) == set(layers)
    for mode in ("luo", "replknet"):
        res = probe(raising, x, layers, mode=mode, crop=crop, trf=trfs)
        for name in layers:
            ref_ps, ref_heat = reference_maps(safe, x, name, mode)
            assert res[name].per_sample is not None
            close(res[name].per_sample, ref_ps)
            close(res[name].heatmap, ref_heat)
