"""Luo et al. (2016), Sec. 2.3 and Fig. 2: the ERF with different nonlinearities.

A stack of 16 random-init 3x3 convolutions (16 channels, no bias) with no nonlinearity, ReLU,
tanh or sigmoid between the convolutions; weights have the variance-preserving gain of each
activation (1, sqrt(2), 5/3, 1). Maps are averaged over 32 weight seeds (linear) or 8 weight
seeds x 4 noise inputs (nonlinear).
Prints sigma, ERF size and Gaussian R^2 per activation and writes
``erf_examples/paper/activations.png`` (maps and their horizontal centre profiles).

Run: ``python examples/paper/activations.py [--out DIR | --docs]`` (about 15 s on a laptop CPU).
"""

from __future__ import annotations

import numpy as np
import torch
from _common import conv_stack, mean_erf, mean_sigma, output_dir, save
from matplotlib.figure import Figure

DEPTH = 16
SIZE = 45  # TRF of 16 layers: 33
# Independent maps averaged: 32 weight seeds for the linear stack (its gradient does not depend
# on the input), 8 seeds x 4 noise inputs with a nonlinearity.
SEEDS_SAMPLES = {"linear": (32, 1), "relu": (8, 4), "tanh": (8, 4), "sigmoid": (8, 4)}
ACTS = ("linear", "relu", "tanh", "sigmoid")
COLORS = ("k", "tab:red", "tab:blue", "tab:green")


def main() -> None:
    out = output_dir(__doc__)
    torch.manual_seed(0)
    fig = Figure(figsize=(12.5, 2.9), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(ACTS) + 1, width_ratios=[1] * len(ACTS) + [1.5])
    print(f"{DEPTH} layers, {SIZE}x{SIZE} input")
    print(f"{'activation':<10}{'TRF':>5}{'sigma':>8}{'m(.95)':>8}{'ERF/TRF':>9}{'R^2':>7}")
    prof_ax = axes[-1]
    for ax, act, color in zip(axes, ACTS, COLORS):

        def build(seed: int, act: str = act) -> tuple:
            return conv_stack(DEPTH, seed=seed, activation=act)

        seeds, samples = SEEDS_SAMPLES[act]
        r, _ = mean_erf(build, (1, SIZE, SIZE), seeds=seeds, samples=samples)
        print(
            f"{act:<10}{max(r.trf.clipped_size):>5}{mean_sigma(r):>8.2f}{r.erf_size:>8}"
            f"{r.ratio:>9.3f}{r.gaussian_r2:>7.3f}"
        )
        heat = r.heatmap.numpy()
        ax.imshow(heat / heat.max(), cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{act}\nσ = {mean_sigma(r):.2f} px, R² = {r.gaussian_r2:.3f}", fontsize=9)
        profile = heat.sum(0)  # marginal along x: smoother than a single row
        x = np.arange(SIZE) - r.centre_pixel[1]
        prof_ax.plot(x, profile / profile.sum(), color=color, lw=1.3, label=act)
    prof_ax.set_xlabel("x − centre (px)", fontsize=9)
    prof_ax.set_ylabel("fraction of ERF mass", fontsize=9)
    prof_ax.set_title("marginal profile (sum over rows)", fontsize=9)
    prof_ax.set_xlim(-16, 16)
    prof_ax.tick_params(labelsize=8)
    prof_ax.grid(alpha=0.3)
    prof_ax.legend(fontsize=8)
    fig.suptitle(f"ERF of {DEPTH} random 3×3 conv layers with different activations", fontsize=11)
    save(fig, "activations.png", out)


if __name__ == "__main__":
    main()
