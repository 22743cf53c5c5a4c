"""Luo et al. (2016), Sec. 2-3 and Fig. 3: ERF ~ sqrt(depth), ERF/TRF ~ 1/sqrt(depth).

Stacks of n = 4 ... 64 3x3 convolutions (16 channels, no bias, no pooling) with random
weights, linear or ReLU, plus the uniform-weight stack as an exact reference. The input is
exactly the TRF (2n + 1 pixels square), so the clipped TRF is the TRF. For each depth the map
is averaged over seeds (and 4 noise samples per seed); we measure

* sigma: the ERF's standard deviation (Luo's measure; mean of the two axes),
* ERF size m(0.95): side of the centred square holding 95% of the mass,
* ERF/TRF: m(0.95) / (2n + 1), and sigma / (2n + 1),

and fit log-log slopes with ``numpy.polyfit``. Writes ``erf_examples/paper/depth_scaling.png``.

Run: ``python examples/paper/depth_scaling.py [--out DIR | --docs]`` (about 1 min on a laptop CPU).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from _common import conv_stack, loglog_slope, mean_erf, mean_sigma, output_dir, progress, save
from matplotlib.figure import Figure

DEPTHS = (4, 6, 8, 12, 16, 24, 32, 48, 64)
CASES = {
    "uniform (exact reference)": dict(weights="uniform", activation="linear", channels=1),
    "random, linear": dict(weights="random", activation="linear", channels=16),
    "random + ReLU": dict(weights="random", activation="relu", channels=16),
}
COLORS = ("0.45", "tab:blue", "tab:red")
# Independent maps averaged per depth: 32 weight seeds for linear stacks (their gradient does
# not depend on the input), 8 seeds x 4 noise inputs with ReLU.
SEEDS_SAMPLES = {"linear": (32, 1), "relu": (8, 4)}
YTICKS = {"sigma": (2, 3, 4, 6, 8, 10), "erf_size": (8, 16, 32, 64, 128), "ratio": (0.25, 0.5, 1)}


def measure(case: str, kw: dict) -> dict[str, np.ndarray]:
    rows = []
    t0 = time.perf_counter()
    for i, depth in enumerate(DEPTHS, 1):
        size = 2 * depth + 1  # = TRF of n 3x3 convolutions

        def build(seed: int, depth: int = depth) -> tuple:
            return conv_stack(depth, seed=seed, **kw)

        seeds, samples = SEEDS_SAMPLES[kw["activation"]]
        if kw["weights"] == "uniform":  # deterministic: one map
            seeds, samples = 1, 1
        r, per_seed = mean_erf(build, (1, size, size), seeds=seeds, samples=samples)
        trf = max(r.trf.clipped_size)
        assert trf == size, (trf, size)
        seed_sigmas = [mean_sigma(p) for p in per_seed]
        progress(
            f"  {case}: depth {depth:>2} ({i}/{len(DEPTHS)}), sigma {mean_sigma(r):.2f} px, "
            f"{time.perf_counter() - t0:.0f} s"
        )
        rows.append(
            (
                depth,
                trf,
                mean_sigma(r),
                float(np.std(seed_sigmas)),
                r.erf_size,
                r.ratio,
                r.gaussian_r2,
            )
        )
    cols = np.array(rows, dtype=float).T
    keys = ("depth", "trf", "sigma", "sigma_seed_std", "erf_size", "ratio", "r2")
    return dict(zip(keys, cols))


def main() -> None:
    out = output_dir(__doc__)
    torch.manual_seed(0)
    progress(f"{len(CASES)} cases x {len(DEPTHS)} depths (about a minute on a laptop CPU)")
    results = {case: measure(case, kw) for case, kw in CASES.items()}

    slopes: dict[str, dict[str, float]] = {}
    for case, m in results.items():
        print(f"\n{case}")
        print(f"{'n':>4}{'TRF':>6}{'sigma':>8}{'±seeds':>8}{'m(.95)':>8}{'ERF/TRF':>9}{'R^2':>7}")
        for i in range(len(DEPTHS)):
            print(
                f"{int(m['depth'][i]):>4}{int(m['trf'][i]):>6}{m['sigma'][i]:>8.2f}"
                f"{m['sigma_seed_std'][i]:>8.2f}{int(m['erf_size'][i]):>8}"
                f"{m['ratio'][i]:>9.3f}{m['r2'][i]:>7.3f}"
            )
        n = m["depth"]
        deep = n >= 16
        slopes[case] = {
            "sigma": loglog_slope(n, m["sigma"])[0],
            "erf_size": loglog_slope(n, m["erf_size"])[0],
            "ratio": loglog_slope(n, m["ratio"])[0],
            "sigma_over_trf": loglog_slope(n, m["sigma"] / m["trf"])[0],
            "sigma_deep": loglog_slope(n[deep], m["sigma"][deep])[0],
            "ratio_deep": loglog_slope(n[deep], m["ratio"][deep])[0],
            "sigma_over_trf_deep": loglog_slope(n[deep], (m["sigma"] / m["trf"])[deep])[0],
        }
        s = slopes[case]
        print(
            f"log-log slopes vs depth: sigma {s['sigma']:.2f}, m(0.95) {s['erf_size']:.2f}, "
            f"ERF/TRF = m(0.95)/TRF {s['ratio']:.2f}, sigma/TRF {s['sigma_over_trf']:.2f}"
        )
        print(
            f"  n >= 16 only:          sigma {s['sigma_deep']:.2f}, "
            f"ERF/TRF {s['ratio_deep']:.2f}, sigma/TRF {s['sigma_over_trf_deep']:.2f}"
        )
    print("\nPaper (Luo et al. 2016): ERF ~ sqrt(n) -> slope 0.5; ERF/TRF ~ 1/sqrt(n) -> -0.5")
    # The TRF is 2n + 1, not proportional to n: even an exact sqrt(n) ERF gives a shallower
    # ERF/TRF slope over a finite range of depths.
    n_all = np.array(DEPTHS, float)
    ideal = loglog_slope(n_all, np.sqrt(n_all) / (2 * n_all + 1))[0]
    ideal_deep = loglog_slope(
        n_all[n_all >= 16], np.sqrt(n_all[n_all >= 16]) / (2 * n_all[n_all >= 16] + 1)
    )[0]
    print(
        f"Reference: an exact sqrt(n) ERF over TRF = 2n+1 has log-log slope {ideal:.2f} "
        f"for n = {DEPTHS[0]}..{DEPTHS[-1]} ({ideal_deep:.2f} for n >= 16)"
    )

    fig = Figure(figsize=(11.5, 3.9), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3)
    panels = (
        ("sigma", "σ (px)", "ERF standard deviation σ"),
        ("erf_size", "m(0.95) (px)", "ERF size m(0.95)"),
        ("ratio", "m(0.95) / TRF", "ERF/TRF ratio"),
    )
    nn_ = np.array(DEPTHS, float)
    fine = np.geomspace(nn_[0], nn_[-1], 50)
    for ax, (key, ylabel, title) in zip(axes, panels):
        for (case, m), color in zip(results.items(), COLORS):
            slope, icpt = loglog_slope(m["depth"], m[key])
            yerr = m["sigma_seed_std"] if key == "sigma" else None
            ax.errorbar(m["depth"], m[key], yerr=yerr, fmt="o", ms=4, color=color, capsize=2, lw=1)
            ax.plot(
                fine,
                np.exp(icpt) * fine**slope,
                "-",
                color=color,
                lw=1.2,
                label=f"{case}: slope {slope:.2f}",
            )
        if key == "erf_size":
            ax.plot(nn_, 2 * nn_ + 1, ":", color="k", lw=1, label="TRF = 2n+1 (slope 1)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(DEPTHS, [str(d) for d in DEPTHS])
        ax.set_yticks(YTICKS[key], [f"{v:g}" for v in YTICKS[key]])
        ax.minorticks_off()
        ax.set_xlabel("depth n (3×3 conv layers)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper left" if key != "ratio" else "upper right")
    fig.suptitle(
        "ERF vs depth, log-log (paper: ERF ∝ √n → slope 0.5, ERF/TRF ∝ 1/√n → slope −0.5)",
        fontsize=11,
    )
    save(fig, "depth_scaling.png", out)


if __name__ == "__main__":
    main()
