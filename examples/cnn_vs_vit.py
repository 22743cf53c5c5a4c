"""ERF growth of a small CNN and a small ViT during the same training (CPU, under a minute).

Task (synthetic): a 32 x 32 noise image holds one bright 6 x 6 square at a random place;
predict its quadrant. Both models answer from their *centre unit* only (the CNN's centre
feature vector, the ViT's centre patch token), so the centre unit has to look far: this is
the unit whose ERF erf-monitor measures. Both models see the same batches, and both are
watched with :func:`erf_monitor.watch` (plain PyTorch loop, optimizer step hook) on one fixed
probe batch:

* CNN: six 3x3 convolutions, one of stride 2; TRF 19 x 19 px, watched at the last ReLU;
* ViT: torchvision ``VisionTransformer`` (patch 4, 3 blocks); TRF global after the first
  block, watched at the last block's output (the patch grid is read from the model; the seed
  is the centre token). Not ``encoder.ln``: a LayerNorm's feature sum is constant at
  initialisation, so its Luo ERF is zero (erf-monitor warns about that).

The figure shows the 50%- and 95%-mass square sides over training, the validation accuracy,
and the ERF maps at initialisation and at the end.

Run:  python examples/cnn_vs_vit.py  [--steps 400] [--every 50] [--out erf_examples/cnn_vs_vit.png]
      (``--docs`` refreshes the documentation's picture, docs/img/vit_cnn_vs_vit.png)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import VisionTransformer

import erf_monitor as em

SIZE = 32
SQUARE = 6


def make_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with one bright square; label = the square's quadrant (0..3)."""
    x = 0.5 * torch.randn(n, 1, SIZE, SIZE, generator=gen)
    pos = torch.randint(0, SIZE - SQUARE + 1, (n, 2), generator=gen)
    for i, (r, c) in enumerate(pos.tolist()):
        x[i, 0, r : r + SQUARE, c : c + SQUARE] += 2.0
    centre = pos * 2 + SQUARE - 1  # twice the square's centre, to stay in integers
    y = (centre[:, 0] >= SIZE - 1).long() * 2 + (centre[:, 1] >= SIZE - 1).long()
    return x, y


class CentreCNN(nn.Module):
    """Six 3x3 convolutions (one of stride 2): a 16 x 16 map; the centre unit is classified."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(w, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.head(f[:, :, f.shape[2] // 2, f.shape[3] // 2])


class CentreViT(nn.Module):
    """torchvision ViT whose head reads the centre patch token instead of the class token."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = VisionTransformer(
            image_size=SIZE, patch_size=4, num_layers=3, num_heads=2, hidden_dim=32,
            mlp_dim=64, num_classes=4,
        )  # fmt: skip
        side = SIZE // 4
        self.centre = 1 + (side // 2) * side + side // 2  # class token first, then row-major

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        tokens = v._process_input(x.expand(-1, 3, -1, -1))
        tokens = torch.cat([v.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return v.heads(v.encoder(tokens)[:, self.centre])


LAYERS = {"CNN": "features.11", "ViT": "vit.encoder.layers.encoder_layer_2"}


def side(area: float) -> float:
    """Side of the centred square from an area ratio of the 32 x 32 input."""
    return math.sqrt(area * SIZE * SIZE)


def main(
    steps: int = 400, every: int = 50, out: str | None = "erf_examples/cnn_vs_vit.png"
) -> dict[str, Any]:
    torch.manual_seed(0)
    models: dict[str, nn.Module] = {"CNN": CentreCNN(), "ViT": CentreViT()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=2e-3) for k, m in models.items()}
    probe, _ = make_batch(16, torch.Generator().manual_seed(123))
    xv, yv = make_batch(512, torch.Generator().manual_seed(7))
    watchers = {
        k: em.watch(m, layers=[LAYERS[k]], every_n_steps=every, optimizer=opts[k],
                    probe_inputs=probe, min_coverage=None, summary=False)
        for k, m in models.items()
    }  # fmt: skip
    first = {k: w.probe() for k, w in watchers.items()}  # step 0: the initial ERF maps
    acc: dict[str, dict[int, float]] = {k: {} for k in models}

    def evaluate(step: int) -> None:
        for k, m in models.items():
            m.eval()
            with torch.no_grad():
                acc[k][step] = (m(xv).argmax(1) == yv).float().mean().item()
            m.train()
        accs = ", ".join(f"{k} {a[step]:.2f}" for k, a in acc.items())
        print(f"step {step}/{steps}: val acc {accs} ({time.perf_counter() - t0:.0f} s)", flush=True)

    gen = torch.Generator().manual_seed(0)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    evaluate(0)
    for step in range(1, steps + 1):
        x, y = make_batch(64, gen)
        for k, m in models.items():
            opts[k].zero_grad()
            loss_fn(m(x), y).backward()
            opts[k].step()  # the watcher probes from the optimizer's step hook
        if step % every == 0:
            evaluate(step)
    for w in watchers.values():
        w.close()
    seconds = time.perf_counter() - t0

    history = {k: w.history[LAYERS[k]] for k, w in watchers.items()}
    for k in models:
        print(f"{k} ({LAYERS[k]}), TRF {first[k][LAYERS[k]].trf}:")  # type: ignore[index]
        for step, s in sorted(history[k].items()):
            print(
                f"  step {step:4d}  50%-mass side {side(s['area_t50']):4.1f} px  "
                f"95%-mass side {side(s['coverage']):4.1f} px  coverage "
                f"{s['coverage']:.3f}  sigma {s['sigma_y']:4.1f} x {s['sigma_x']:4.1f} px  "
                f"val acc {acc[k].get(step, float('nan')):.2f}"
            )
    print(f"{seconds:.1f} s for {steps} steps of both models (probes included)")
    last = {k: w.latest for k, w in watchers.items()}
    if out:
        plot(history, acc, first, last, out)
    return {"history": history, "acc": acc, "seconds": seconds}


def plot(
    history: dict[str, dict[int, dict[str, float]]],
    acc: dict[str, dict[int, float]],
    first: dict[str, Any],
    last: dict[str, Any],
    out: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    colours = {"CNN": "tab:blue", "ViT": "tab:orange"}
    cmap = plt.get_cmap("inferno").with_extremes(bad="lightgrey")  # 0: outside the TRF
    fig = plt.figure(figsize=(13, 6.2), constrained_layout=True)
    grid = fig.add_gridspec(2, 5)
    ax_size = fig.add_subplot(grid[0, 0:2])
    ax_acc = fig.add_subplot(grid[1, 0:2])
    for k, h in history.items():
        steps = sorted(h)
        trf = first[k][LAYERS[k]].trf
        label = f"{k} ({'TRF global' if trf.is_global else f'TRF {int(trf.size[0])} px'})"
        ax_size.plot(steps, [side(h[s]["area_t50"]) for s in steps], "o-", color=colours[k],
                     label=f"{label}: 50% mass")  # fmt: skip
        ax_size.plot(steps, [side(h[s]["coverage"]) for s in steps], "s--", color=colours[k],
                     alpha=0.6, label=f"{k}: 95% mass")  # fmt: skip
        a = sorted(acc[k].items())
        ax_acc.plot([s for s, _ in a], [v for _, v in a], "o-", color=colours[k], label=k)
    ax_size.axhline(SIZE, color="grey", lw=0.8, ls=":")
    ax_size.set_ylabel("mass square side, in the input (px)")
    ax_size.set_title("ERF size of the centre unit (input 32 x 32)")
    ax_size.set_ylim(0, 44)
    ax_size.legend(fontsize=7, ncol=2, loc="upper center")
    ax_acc.set_ylabel("validation accuracy")
    ax_acc.axhline(0.25, color="grey", lw=0.8, ls=":")
    for ax in (ax_size, ax_acc):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    for row, k in enumerate(history):
        maps = [(first[k], "init"), (last[k], f"step {max(history[k])}")]
        for col, (res, when) in enumerate(maps):
            r = res[LAYERS[k]]
            ax = fig.add_subplot(grid[row, 2 + col])
            h = r.heatmap.numpy()
            ax.imshow(h, cmap=cmap, norm=LogNorm(vmin=h.max() * 1e-3, vmax=h.max()))
            ax.set_title(f"{k} ERF (log, grey = 0), {when}\ncoverage {r.coverage:.2f}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        ax = fig.add_subplot(grid[row, 4])
        for res, when, style in ((first[k], "init", "--"), (last[k], "end", "-")):
            h = res[LAYERS[k]].heatmap
            profile = (h / h.sum()).sum(0).numpy()
            ax.plot(profile, style, color=colours[k], label=when)
        ax.set_title(f"{k}: column profile (mass share)", fontsize=9)
        ax.set_xlabel("input column (px)")
        ax.legend(fontsize=8)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    torch.set_num_threads(1)  # small models: one thread is fastest on a shared CPU
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=50)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default="erf_examples/cnn_vs_vit.png", help="figure file")
    where.add_argument("--docs", action="store_true", help="refresh docs/img/vit_cnn_vs_vit.png")
    args = parser.parse_args()
    main(args.steps, args.every, "docs/img/vit_cnn_vs_vit.png" if args.docs else args.out)
