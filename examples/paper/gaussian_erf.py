"""Luo et al. (2016), Fig. 1: the ERF of a plain conv stack is Gaussian-shaped.

ERF maps of stacks of 5, 10 and 20 3x3 convolutions (no pooling, no bias) with
(a) uniform weights and no nonlinearity, (b) random weights, no nonlinearity,
(c) random weights + ReLU. Prints sigma and the R^2 of the moment-matched Gaussian
(``ERFResult.gaussian_r2``) per case and writes ``erf_examples/paper/gaussian_erf.png``.

Run: ``python examples/paper/gaussian_erf.py [--out DIR | --docs]`` (about 10 s on a laptop CPU).
"""

from __future__ import annotations

import math

import torch
from _common import conv_stack, mean_erf, mean_sigma, output_dir, save
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

DEPTHS = (5, 10, 20)
SIZE = 45  # odd: the centre unit sits exactly on pixel (22, 22); TRF of 20 layers = 41
CASES = {
    "uniform": dict(weights="uniform", activation="linear", channels=1),
    "random": dict(weights="random", activation="linear", channels=16),
    "random + ReLU": dict(weights="random", activation="relu", channels=16),
}
# Independent maps averaged per random case: 32 weight seeds for the linear stack (its
# gradient does not depend on the input), 8 seeds x 4 noise inputs with ReLU.
SEEDS_SAMPLES = {"linear": (32, 1), "relu": (8, 4)}


def main() -> None:
    out = output_dir(__doc__)
    torch.manual_seed(0)
    fig = Figure(figsize=(7.6, 7.4), dpi=100, layout="constrained")
    axes = fig.subplots(len(DEPTHS), len(CASES))
    print(f"{'case':<15}{'depth':>6}{'TRF':>6}{'sigma':>8}{'exact':>8}{'R^2':>7}{'m(.95)':>8}")
    for row, depth in enumerate(DEPTHS):
        for col, (case, kw) in enumerate(CASES.items()):
            seeds, samples = SEEDS_SAMPLES[kw["activation"]]
            if kw["weights"] == "uniform":  # deterministic: one map
                seeds, samples = 1, 1

            def build(seed: int, depth: int = depth, kw: dict = kw) -> tuple:
                return conv_stack(depth, seed=seed, **kw)

            r, _ = mean_erf(build, (1, SIZE, SIZE), seeds=seeds, samples=samples)
            # n-fold box convolution: per-axis variance n (k^2 - 1) / 12 (DESIGN.md, §2).
            exact = math.sqrt(depth * 8 / 12) if case == "uniform" else float("nan")
            print(
                f"{case:<15}{depth:>6}{int(r.trf.size[0]):>6}{mean_sigma(r):>8.2f}"
                f"{exact:>8.2f}{r.gaussian_r2:>7.3f}{r.erf_size:>8}"
            )
            ax = axes[row, col]
            heat = r.heatmap.numpy()
            ax.imshow(heat / heat.max(), cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
            (y0, y1), (x0, x1) = r.trf.clipped
            ax.add_patch(
                Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, ec="c", lw=1)
            )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"σ = {mean_sigma(r):.2f} px, R² = {r.gaussian_r2:.3f}", fontsize=9, pad=3)
            if row == 0:
                ax.annotate(
                    case,
                    (0.5, 1.18),
                    xycoords="axes fraction",
                    ha="center",
                    fontsize=11,
                    weight="bold",
                )
            if col == 0:
                ax.set_ylabel(f"{depth} layers", fontsize=11)
    fig.suptitle(
        f"Centre-pixel ERF of 3×3 conv stacks ({SIZE}×{SIZE} input; cyan: TRF)", fontsize=11
    )
    save(fig, "gaussian_erf.png", out)


if __name__ == "__main__":
    main()
