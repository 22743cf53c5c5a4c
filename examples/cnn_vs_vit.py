"""ERF growth of a small CNN and a small ViT trained on the same synthetic task (CPU).

Task: 32 x 32 noise images with one bright 6 x 6 square at a random place; predict its
quadrant (4 classes). Both models see the same batches. Every ``--every`` steps the
centre-pixel ERF of each model's last feature layer is measured on one fixed probe batch
(``compute_erf`` with precomputed TRFs): the CNN's last convolution (finite TRF) and the
ViT's last encoder block (global TRF: the centre *patch token* is the seed; the patch grid is
inferred from the torchvision ``VisionTransformer``).

Run:  python examples/cnn_vs_vit.py  [--steps 150] [--every 25] [--out docs/img/vit_cnn_vs_vit.png]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torchvision.models import VisionTransformer

import erf_monitor as em

SIZE = 32


def make_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = 0.5 * torch.randn(n, 1, SIZE, SIZE, generator=gen)
    pos = torch.randint(0, SIZE - 6, (n, 2), generator=gen)
    for i, (r, c) in enumerate(pos.tolist()):
        x[i, 0, r : r + 6, c : c + 6] += 2.0
    centre = pos + 3
    y = (centre[:, 0] >= SIZE // 2).long() * 2 + (centre[:, 1] >= SIZE // 2).long()
    return x, y


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )  # fmt: skip


def small_vit() -> VisionTransformer:
    return VisionTransformer(
        image_size=SIZE, patch_size=4, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=4,
    )  # fmt: skip


class GreyToRGB(nn.Module):
    """torchvision's ViT wants 3 channels: repeat the grey channel."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x.expand(-1, 3, -1, -1))


def main(
    steps: int = 150, every: int = 25, out: str | None = "docs/img/vit_cnn_vs_vit.png"
) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    models = {"CNN": small_cnn(), "ViT": GreyToRGB(small_vit())}
    layers = {"CNN": "8", "ViT": "vit.encoder.layers.encoder_layer_2"}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=2e-3) for k, m in models.items()}
    probe, _ = make_batch(8, torch.Generator().manual_seed(123))
    trfs = {
        k: em.theoretical_rf(m, (1, SIZE, SIZE), [layers[k]]) for k, m in models.items()
    }  # computed once: the probe below reuses them
    history: dict[str, dict[str, list[float]]] = {
        k: {"step": [], "erf_size": [], "coverage": [], "acc": []} for k in models
    }
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for step in range(steps + 1):
        if step % every == 0:
            xv, yv = make_batch(256, torch.Generator().manual_seed(7))
            for k, m in models.items():
                r = em.compute_erf(m, probe, layers=[layers[k]], trf=trfs[k])[layers[k]]
                with torch.no_grad():
                    m.eval()
                    acc = (m(xv).argmax(1) == yv).float().mean().item()
                    m.train()
                h = history[k]
                h["step"].append(step)
                h["erf_size"].append(r.erf_size)
                h["coverage"].append(r.coverage)
                h["acc"].append(acc)
            print(
                f"step {step:4d}  "
                + "  ".join(
                    f"{k}: erf_size {history[k]['erf_size'][-1]:2d} px, "
                    f"coverage {history[k]['coverage'][-1]:.3f}, acc {history[k]['acc'][-1]:.2f}"
                    for k in models
                )
            )
        if step == steps:
            break
        x, y = make_batch(64, gen)
        for k, m in models.items():
            opts[k].zero_grad()
            loss_fn(m(x), y).backward()
            opts[k].step()
    print(f"TRF  CNN: {trfs['CNN'][layers['CNN']]}  ViT: {trfs['ViT'][layers['ViT']]}")
    print(f"{time.perf_counter() - t0:.1f} s")
    if out:
        plot(history, trfs, layers, out)
    return history


def plot(history: dict, trfs: dict, layers: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), constrained_layout=True)
    colours = {"CNN": "tab:blue", "ViT": "tab:orange"}
    for k, h in history.items():
        trf = trfs[k][layers[k]]
        label = f"{k} ({'global' if trf.is_global else f'TRF {int(trf.size[0])} px'})"
        axes[0].plot(h["step"], h["erf_size"], "o-", color=colours[k], label=label)
        axes[1].plot(h["step"], h["coverage"], "o-", color=colours[k], label=k)
        axes[2].plot(h["step"], h["acc"], "o-", color=colours[k], label=k)
    axes[0].set_ylabel("ERF size (95% mass square side, px)")
    axes[1].set_ylabel("coverage (fraction of 32x32 input)")
    axes[2].set_ylabel("validation accuracy")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Centre-pixel ERF of the last feature layer during the same training")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--out", default="docs/img/vit_cnn_vs_vit.png")
    args = parser.parse_args()
    main(args.steps, args.every, args.out)
