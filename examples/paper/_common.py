"""Shared helpers of the paper reproductions (Luo et al., NeurIPS 2016).

Every script builds small random-init convolution stacks, measures the centre-pixel ERF of the
last convolution with :func:`erf_monitor.compute_erf`, averages maps over several weight seeds
(and input samples), and writes a figure into ``erf_examples/paper/`` (``--out DIR`` to
change it; ``--docs`` refreshes the tracked picture in ``docs/img/paper/`` instead).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

import erf_monitor as em

DOCS_DIR = Path(__file__).resolve().parents[2] / "docs" / "img" / "paper"
DEFAULT_OUT = Path("erf_examples") / "paper"

#: Activation modules by name; ``None`` means a linear network.
ACTIVATIONS: dict[str, Callable[[], nn.Module] | None] = {
    "linear": None,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

#: Weight gain that keeps the forward signal's variance roughly constant per layer.
GAINS = {"linear": 1.0, "relu": math.sqrt(2.0), "tanh": 5.0 / 3.0, "sigmoid": 1.0}


def conv_stack(
    depth: int,
    *,
    channels: int = 16,
    in_channels: int = 1,
    kernel: int = 3,
    activation: str = "linear",
    weights: str = "random",
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    seed: int = 0,
) -> tuple[nn.Sequential, str]:
    """A stack of ``depth`` ``kernel x kernel`` convolutions (no bias, "same" padding).

    Args:
        depth: number of convolutions.
        channels: channels of every hidden layer (the last one too).
        in_channels: input channels.
        kernel: odd kernel size.
        activation: key of :data:`ACTIVATIONS`, applied between convolutions (not after the
            last one, whose output is the probed layer).
        weights: ``"random"`` (normal, std ``gain / sqrt(fan_in)``) or ``"uniform"`` (every
            weight ``1 / fan_in``: Luo's all-ones kernels, rescaled so that values stay finite;
            the scale does not change the normalised map).
        strides: per-layer strides (default all 1).
        dilations: per-layer dilations (default all 1).
        seed: seed of the weights.

    Returns:
        The model and the name of its last convolution.
    """
    strides = list(strides or [1] * depth)
    dilations = list(dilations or [1] * depth)
    gen = torch.Generator().manual_seed(seed)
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    for i in range(depth):
        c_in = in_channels if i == 0 else channels
        pad = dilations[i] * (kernel - 1) // 2
        conv = nn.Conv2d(
            c_in,
            channels,
            kernel,
            stride=strides[i],
            padding=pad,
            dilation=dilations[i],
            bias=False,
        )
        fan_in = c_in * kernel * kernel
        with torch.no_grad():
            if weights == "uniform":
                conv.weight.fill_(1.0 / fan_in)
            elif weights == "random":
                std = GAINS[activation] / math.sqrt(fan_in)
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * std)
            else:
                raise ValueError(f"weights must be 'uniform' or 'random', got {weights!r}")
        layers.append(conv)
        if act is not None and i < depth - 1:
            layers.append(act())
    return nn.Sequential(*layers), str(len(layers) - 1)


def mean_erf(
    build: Callable[[int], tuple[nn.Module, str]],
    input_shape: Sequence[int],
    *,
    seeds: int = 8,
    samples: int = 4,
) -> tuple[em.ERFResult, list[em.ERFResult]]:
    """ERF averaged over weight seeds: each seed's map is normalised to unit mass first.

    Args:
        build: ``build(seed) -> (model, layer)``.
        input_shape: ``(C, H, W)`` of the probe input (standard normal noise).
        seeds: number of weight seeds.
        samples: probe samples per seed.

    Returns:
        A result whose heatmap is the mean of the per-seed unit-mass maps (TRF and centre of
        the first seed; they do not depend on the weights), and the per-seed results.
    """
    per_seed: list[em.ERFResult] = []
    total: torch.Tensor | None = None
    trf = None
    for seed in range(seeds):
        model, layer = build(seed)
        if trf is None:  # the TRF depends on the architecture only: analyse it once
            trf = em.theoretical_rf(model, tuple(input_shape), [layer])
        x = torch.randn((samples, *input_shape), generator=torch.Generator().manual_seed(seed))
        r = em.compute_erf(model, x, layers=[layer], trf=trf)[layer]
        per_seed.append(r)
        unit = r.heatmap.double() / r.heatmap.double().sum()
        total = unit if total is None else total + unit
    assert total is not None
    mean = dataclasses.replace(per_seed[0], heatmap=(total / seeds).float(), _cache={})
    return mean, per_seed


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit ``log y = slope * log x + intercept``; returns ``(slope, intercept)``."""
    slope, intercept = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return float(slope), float(intercept)


def mean_sigma(r: em.ERFResult) -> float:
    """Mean of the per-axis standard deviations (pixels)."""
    return float(np.mean(r.sigma))


def output_dir(description: str | None) -> Path:
    """Where the figure goes, from the command line (``--out DIR`` or ``--docs``)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=DEFAULT_OUT, help="figure directory")
    where.add_argument(
        "--docs", action="store_true", help=f"refresh the documentation's picture in {DOCS_DIR}"
    )
    args = parser.parse_args()
    return DOCS_DIR if args.docs else args.out


def progress(text: str) -> None:
    """One line of progress, shown at once (long runs print as they go)."""
    print(text, flush=True)


def save(fig, name: str, out: Path = DEFAULT_OUT) -> Path:  # type: ignore[no-untyped-def]
    """Save a matplotlib figure as ``<out>/<name>`` and return the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=fig.dpi)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return path
