"""Figures of docs/guides/vit.md: ViT / windowed-attention ERF maps, 1-D and 3-D ERF maps.

Random initialisation (no weights are downloaded), synthetic inputs, CPU, a few seconds.

Run from the repository root:  python docs/scripts/make_vit_figures.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import VisionTransformer

import erf_monitor as em
from erf_monitor.viz.render import erf_figure

OUT = Path("docs/img")


class WindowBlock(nn.Module):
    """Swin-style attention inside 4 x 4-token windows of a channels-last (N, H, W, C) map."""

    def __init__(self, dim: int = 16, ws: int = 4) -> None:
        super().__init__()
        self.ws = ws
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.ws
        t = self.norm(x).view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        t = t.reshape(-1, ws * ws, c)  # windows merged into the batch
        t = self.attn(t, t, t, need_weights=False)[0]
        t = t.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        return x + t.reshape(b, h, w, c)


class TinySwin(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.window = WindowBlock(dim)
        self.mix = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)  # crosses window borders

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.window(self.patch(x).permute(0, 2, 3, 1))  # (N, H, W, C)
        return self.mix(y.permute(0, 3, 1, 2))


def vit_figure() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 64, 64)
    vit = VisionTransformer(
        image_size=64, patch_size=8, num_layers=4, num_heads=2, hidden_dim=64, mlp_dim=128
    )
    res = dict(
        em.compute_erf(
            vit, x, layers=["conv_proj", "encoder.layers.encoder_layer_0",
                            "encoder.layers.encoder_layer_3"],
        )
    )  # fmt: skip
    swin = TinySwin()
    res.update(
        em.compute_erf(
            swin, x, layers=["window", "mix"],
            token_layout={"window": em.TokenLayout(channels_last=True)},
        )
    )  # fmt: skip
    fig = erf_figure(
        res, log_scale=True, ncols=5, panel_size=3.0,
        title="torchvision ViT (patch 8, 64 x 64, random init) and a windowed-attention block",
    )  # fmt: skip
    fig.savefig(OUT / "vit_layers.png", dpi=90)


def nd_figure() -> None:
    torch.manual_seed(0)
    c1 = nn.Sequential(
        nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 5, stride=2, padding=2),
        nn.ReLU(), nn.Conv1d(8, 8, 5, padding=2),
    )  # fmt: skip
    r1 = em.compute_erf(c1, torch.randn(16, 1, 128), layers=["4"])
    c3 = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, stride=2, padding=1),
        nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1),
    )  # fmt: skip
    r3 = em.compute_erf(c3, torch.randn(4, 1, 16, 24, 32), layers=["6"])
    fig = erf_figure([r1["4"], r3["6"]], ncols=2, panel_size=5.0,
                     title="1-D: a curve; 3-D: max-projections (y,x | z,x | z,y)")  # fmt: skip
    fig.savefig(OUT / "vit_nd_inputs.png", dpi=90)


if __name__ == "__main__":
    torch.set_num_threads(1)
    vit_figure()
    nd_figure()
    print("wrote", OUT / "vit_layers.png", OUT / "vit_nd_inputs.png")
