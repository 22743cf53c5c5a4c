"""Luo et al. (2016), Sec. 3 and Fig. 2: subsampling and dilation enlarge the ERF.

Four random-init 3x3 conv stacks (16 channels, no bias), probed at their last convolution:

* ``8 conv``: the baseline (TRF 17),
* ``8 conv, stride 2``: convs 3 and 6 have stride 2 (TRF 35),
* ``8 conv, dilated``: dilations 1,1,1,2,2,2,4,4 (same TRF 35, no resolution loss),
* ``17 conv``: a plain stack with the same TRF 35, reached by depth alone,
* ``8 conv, dilation 2``: every convolution dilated by 2 (TRF 33; sigma should double).

The dilation schedule 1,1,1,2,2,2,4,4 is the "a trous" equivalent of the stride-2 stack: with
the same weights its centre unit computes exactly the same function, so the two maps must
coincide (a check of the probe and of the TRF analysis, not a coincidence).

Maps are averaged over 8 weight seeds x 4 noise inputs; the table is printed for linear and
ReLU stacks, the figure (``erf_examples/paper/subsampling_dilation.png``) shows the ReLU ones.

Run: ``python examples/paper/subsampling_dilation.py [--out DIR | --docs]`` (about 20 s, CPU).
"""

from __future__ import annotations

import dataclasses

import torch
from _common import conv_stack, mean_erf, mean_sigma, output_dir, save

from erf_monitor.viz.render import erf_figure

SIZE = 64
SEEDS = 8
VARIANTS = {
    "8 conv": dict(depth=8),
    "8 conv, stride 2 @ 3,6": dict(depth=8, strides=[1, 1, 2, 1, 1, 2, 1, 1]),
    "8 conv, dilation 1,1,1,2,2,2,4,4": dict(depth=8, dilations=[1, 1, 1, 2, 2, 2, 4, 4]),
    "17 conv (same TRF)": dict(depth=17),
    "8 conv, dilation 2": dict(depth=8, dilations=[2] * 8),
}


def main() -> None:
    out = output_dir(__doc__)
    torch.manual_seed(0)
    shown = []
    for activation in ("linear", "relu"):
        print(f"\n{activation} stacks, {SIZE}x{SIZE} input")
        print(
            f"{'variant':<34}{'TRF':>5}{'sigma':>8}{'m(.95)':>8}{'ERF/TRF':>9}"
            f"{'vs 8 conv':>11}{'R^2':>7}"
        )
        base_sigma = None
        for name, kw in VARIANTS.items():
            kw = dict(kw)
            depth = kw.pop("depth")

            def build(seed: int, depth: int = depth, kw: dict = kw, act: str = activation) -> tuple:
                return conv_stack(depth, seed=seed, activation=act, **kw)

            r, _ = mean_erf(build, (1, SIZE, SIZE), seeds=SEEDS, samples=4)
            sigma = mean_sigma(r)
            base_sigma = base_sigma or sigma
            print(
                f"{name:<34}{max(r.trf.clipped_size):>5}{sigma:>8.2f}{r.erf_size:>8}"
                f"{r.ratio:>9.3f}{sigma / base_sigma:>10.2f}x{r.gaussian_r2:>7.3f}"
            )
            if activation == "relu":
                shown.append(dataclasses.replace(r, name=name, _cache={}))
    fig = erf_figure(
        shown,
        ncols=3,
        panel_size=3.3,
        title="Random-init 3×3 conv + ReLU stacks, 64×64 input: subsampling and dilation "
        "enlarge the ERF (cyan: TRF, white: 95% mass)",
    )
    save(fig, "subsampling_dilation.png", out)


if __name__ == "__main__":
    main()
