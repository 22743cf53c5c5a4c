"""1-D (Conv1d) and 3-D (Conv3d) inputs: exact ERF maps, TRFs, metrics, rendering, watching."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

import erf_monitor as em
from erf_monitor.viz.render import render_heatmap


def ones_stack(nd: int, n: int, k: int) -> nn.Sequential:
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[nd]
    layers = [conv(1, 1, k, padding=k // 2, bias=False) for _ in range(n)]
    for c in layers:
        nn.init.ones_(c.weight)
    return nn.Sequential(*layers)


def box_profile(n: int, k: int, size: int) -> np.ndarray:
    """n-fold convolution of a width-k box, centred on size // 2, clipped by zero padding.

    With zero padding the map of a linear all-ones stack counts the paths from each input
    pixel to the centre unit that stay inside the input at every layer.
    """
    grad = np.zeros(size)
    grad[size // 2] = 1.0
    for _ in range(n):
        grad = np.convolve(grad, np.ones(k), mode="same")
    return grad


@pytest.mark.parametrize(("n", "k", "size"), [(3, 3, 31), (4, 5, 41), (2, 3, 16)])
def test_conv1d_stack_is_n_fold_box(n: int, k: int, size: int) -> None:
    net = ones_stack(1, n, k)
    x = torch.randn(2, 1, size)
    r = em.compute_erf(net, x, layers=[str(n - 1)])[str(n - 1)]
    expected = box_profile(n, k, size)
    assert r.heatmap.shape == (size,)
    np.testing.assert_allclose(r.heatmap.numpy(), expected, rtol=1e-6)
    assert r.trf is not None and r.trf.size == (float(n * (k - 1) + 1),)
    # Far from the borders the profile is the full n-fold box: variance n (k^2 - 1) / 12.
    if n * (k - 1) + 1 <= size:
        (sigma,) = r.sigma
        assert sigma**2 == pytest.approx(n * (k * k - 1) / 12, rel=1e-6)
    s = r.scalars()
    assert {"sigma_x", "centroid_offset_x", "erf_size", "coverage"} <= set(s)
    assert "sigma_y" not in s
    assert s["trf_size"] == n * (k - 1) + 1
    img = render_heatmap(r)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


def test_conv3d_stack_is_outer_product_of_profiles() -> None:
    n, k, shape = 2, 3, (9, 11, 13)
    net = ones_stack(3, n, k)
    x = torch.randn(2, 1, *shape)
    r = em.compute_erf(net, x, layers=["1"])["1"]
    pz, py, px = (box_profile(n, k, s) for s in shape)
    expected = np.einsum("i,j,k->ijk", pz, py, px)
    assert r.heatmap.shape == shape
    np.testing.assert_allclose(r.heatmap.numpy(), expected, rtol=1e-6)
    assert r.trf is not None and r.trf.size == (5.0, 5.0, 5.0)
    for sigma in r.sigma:
        assert sigma**2 == pytest.approx(n * (k * k - 1) / 12, rel=1e-6)
    s = r.scalars()
    assert {"sigma_z", "sigma_y", "sigma_x", "centroid_offset_z"} <= set(s)
    assert r.centre_pixel == (4, 5, 6)
    img = render_heatmap(r)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


def _train(model: nn.Module, watcher: em.Watcher, x: torch.Tensor, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        watcher.step()


def _written(tmp: Path) -> list[Path]:
    return sorted(p for p in tmp.rglob("*") if p.is_file())


def test_watch_conv1d(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3, stride=2, padding=1)
    )
    x = torch.randn(4, 2, 32)
    w = em.watch(net, layers=["2"], every_n_steps=1, logger=str(tmp_path), probe_inputs=x)
    with w:
        _train(net, w, x, 3)
    files = _written(tmp_path)
    assert files, "the watcher wrote nothing"
    assert any(p.suffix == ".png" for p in files)
    rows = [p for p in files if p.suffix == ".csv"]
    assert rows and "sigma_x" in rows[0].read_text()
    with rows[0].open() as fh:
        assert len(list(csv.reader(fh))) >= 3


def test_watch_small_vit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    x = torch.randn(2, 3, 32, 32)
    layers = ["conv_proj", "encoder.layers.encoder_layer_1"]
    w = em.watch(
        vit, layers=layers, every_n_steps=1, logger=str(tmp_path), probe_inputs=x, strict=True,
        metrics=["erf_size", "coverage", "trf_global"],
    )  # fmt: skip
    with w:
        _train(vit, w, x, 2)
    files = _written(tmp_path)
    assert any(p.suffix == ".png" for p in files)
    text = " ".join(p.read_text() for p in files if p.suffix == ".csv")
    assert "encoder.layers.encoder_layer_1" in text and "trf_global" in text
    latest = w.latest if hasattr(w, "latest") else None
    if latest is not None:
        r = latest["encoder.layers.encoder_layer_1"]
        assert r.heatmap.shape == (32, 32) and r.trf is not None and r.trf.is_global


def _reference_radius(profile: np.ndarray, centre: tuple[int, ...], t: float) -> int:
    """First i whose centred cube [c - i, c + i] (clipped) holds more than t of the mass."""
    total = profile.sum()
    i = 0
    while True:
        box = tuple(slice(max(c - i, 0), c + i + 1) for c in centre)
        if profile[box].sum() > t * total:
            return i
        i += 1


@pytest.mark.parametrize("t", [0.2, 0.5, 0.95])
def test_mass_extent_is_an_interval_in_1d_and_a_cube_in_3d(t: float) -> None:
    # 1-D: n = 4 boxes of width 5 on 41 samples; the map is the exact profile (tested above).
    r1 = em.compute_erf(ones_stack(1, 4, 5), torch.randn(1, 1, 41), layers=["3"])["3"]
    p1 = box_profile(4, 5, 41)
    i1 = _reference_radius(p1, (20,), t)
    assert r1.centre_pixel == (20,)
    assert r1.mass_extent(t) == 2 * i1 + 1
    lo, hi = max(20 - i1, 0), min(20 + i1, 40)
    assert r1.area_ratio(t) == pytest.approx((hi - lo + 1) / 41)
    # 3-D: the map is the outer product of three profiles; the extent is a centred cube.
    shape = (9, 11, 13)
    r3 = em.compute_erf(ones_stack(3, 2, 3), torch.randn(1, 1, *shape), layers=["1"])["1"]
    p3 = np.einsum("i,j,k->ijk", *(box_profile(2, 3, s) for s in shape))
    i3 = _reference_radius(p3, (4, 5, 6), t)
    assert r3.mass_extent(t) == 2 * i3 + 1
    vol = np.prod([min(c + i3, s - 1) - max(c - i3, 0) + 1 for c, s in zip((4, 5, 6), shape)])
    assert r3.area_ratio(t) == pytest.approx(vol / np.prod(shape))
