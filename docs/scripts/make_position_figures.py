"""Make the pictures of docs/guides/positions.md and of the shape sections of docs/concepts.md.

Everything is computed with erf-monitor itself on random-init models (no weights, no data
downloads), into docs/img/positions/. Run from the repository root (a few minutes on a CPU):

    python docs/scripts/make_position_figures.py
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torchvision
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse, Rectangle
from torch import nn

import erf_monitor as em
from erf_monitor.measure.shape import cross_score, principal_axes

OUT = Path(__file__).resolve().parents[1] / "img" / "positions"
CMAP = "inferno"


def save(fig: Figure, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    fig.savefig(path, dpi=fig.dpi)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def ones_stack(n: int, k: int = 3) -> nn.Sequential:
    convs = [nn.Conv2d(1, 1, k, padding=k // 2, bias=False) for _ in range(n)]
    for c in convs:
        nn.init.ones_(c.weight)
    return nn.Sequential(*convs)


def dilated_net(seed: int = 0) -> nn.Sequential:
    """A non-overlapping 4x4 stem (stride 4) then three 3x3 convolutions of dilation 2: the
    taps of the dilated layers land on every other stem unit, i.e. every other 4-pixel band
    of the input (gridding)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 4, stride=4), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.ReLU()]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- concepts


def border_concept() -> None:
    """Centre vs corner unit of an all-ones stack: the image clips the corner's square."""
    net = ones_stack(6)
    x = torch.randn(1, 1, 33, 33)
    res = em.compute_erf(net, x, ["5"], position="corners")["5"]
    assert res.field is not None
    fig = Figure(figsize=(9.5, 3.6), dpi=110, layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, key in zip(axes, ["centre", "corner_top_left", "corner_bottom_right"]):
        r = res.field[key]
        ax.imshow(r.heatmap.numpy(), cmap=CMAP, interpolation="nearest")
        half = (r.erf_size - 1) // 2
        cy, cx = r.centre_pixel
        ax.add_patch(Rectangle((cx - half - 0.5, cy - half - 0.5), r.erf_size, r.erf_size,
                               fill=False, ec="cyan", lw=1.4, ls="--"))  # fmt: skip
        assert r.trf is not None
        (r0, r1), (c0, c1) = r.trf.clipped
        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False,
                               ec="white", lw=1.0))  # fmt: skip
        ax.plot([cx], [cy], "c+", ms=10)
        oy, ox = r.centroid_offset
        ax.annotate("", (cx + ox, cy + oy), (cx, cy),
                    arrowprops={"arrowstyle": "->", "color": "lime", "lw": 1.5})  # fmt: skip
        ax.set_xlim(-0.5, 32.5)
        ax.set_ylim(32.5, -0.5)
        ax.set_title(
            f"{key}: unit {r.output_index}\nerf_size {r.erf_size}, visible "
            f"{r.visible_size:.1f}, coverage_trf {r.coverage_trf:.2f}",
            fontsize=8.5,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"Six all-ones 3x3 convolutions, zero padding (border_ratio {res.field.border_ratio:.2f})"
        "\ndashed: 95%-mass square around the unit's centre pixel (+); white: clipped TRF; "
        "green: centroid offset",
        fontsize=9,
    )
    save(fig, "border.png")


def gaussian(shape: tuple[int, int], centre: tuple[float, float], sigmas: tuple[float, float],
             angle_deg: float) -> torch.Tensor:  # fmt: skip
    """A Gaussian with widths ``sigmas`` (major, minor), major axis at ``angle_deg`` from +x
    towards +y (rows down)."""
    y, x = torch.meshgrid(
        torch.arange(shape[0], dtype=torch.float64), torch.arange(shape[1], dtype=torch.float64),
        indexing="ij",
    )  # fmt: skip
    t = math.radians(angle_deg)
    dx, dy = x - centre[1], y - centre[0]
    u = dx * math.cos(t) + dy * math.sin(t)
    v = -dx * math.sin(t) + dy * math.cos(t)
    return torch.exp(-0.5 * ((u / sigmas[0]) ** 2 + (v / sigmas[1]) ** 2))


def principal_axes_concept() -> None:
    m = gaussian((61, 61), (30, 30), (9.0, 3.0), 30.0)
    (major, minor), angle = principal_axes(m)
    fig = Figure(figsize=(4.6, 4.2), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.imshow(m.numpy(), cmap=CMAP)
    cy, cx = 30, 30
    for scale in (1, 2):
        ax.add_patch(Ellipse((cx, cy), 2 * scale * major, 2 * scale * minor, angle=angle,
                             fill=False, ec="cyan", lw=1.2))  # fmt: skip
    t = math.radians(angle)
    ax.annotate("", (cx + 2 * major * math.cos(t), cy + 2 * major * math.sin(t)), (cx, cy),
                arrowprops={"arrowstyle": "->", "color": "white", "lw": 1.5})  # fmt: skip
    ax.axhline(cy, color="white", lw=0.6, ls=":")
    ax.set_title(
        f"widths {major:.2f}, {minor:.2f} px: anisotropy {major / minor:.2f}\n"
        f"axis_angle {angle:.1f} deg (from +x towards +y, y down)",
        fontsize=9,
    )
    save(fig, "principal_axes.png")


def cross_concept() -> None:
    plus = torch.zeros(31, 31, dtype=torch.float64)
    plus[14:17, 3:28] = 1.0  # arms 3 pixels wide
    plus[3:28, 14:17] = 1.0
    gauss = gaussian((31, 31), (15, 15), (6.0, 4.0), 0.0)
    ex = torch.zeros(31, 31, dtype=torch.float64)
    for i in range(-10, 11):
        ex[15 + i, 15 + i] = ex[15 + i, 15 - i] = 1.0
    # A real cross-shaped ERF: a layer summing a row and a column convolution (axial mixing).

    class Axial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.row = nn.Conv2d(3, 8, (1, 15), padding=(0, 7))
            self.col = nn.Conv2d(3, 8, (15, 1), padding=(7, 0))
            self.mix = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mix(torch.relu(self.row(x) + self.col(x)))

    axial = em.compute_erf(Axial(), torch.randn(8, 3, 31, 31), ["mix"])["mix"]
    maps = [("'+'", plus), ("separable Gaussian", gauss), ("'x'", ex),
            ("axial layer (random init)", axial.heatmap)]  # fmt: skip
    fig = Figure(figsize=(11, 3.2), dpi=110, layout="constrained")
    for ax, (title, m) in zip(fig.subplots(1, 4), maps):
        ax.imshow(m.numpy() if isinstance(m, torch.Tensor) else m, cmap=CMAP)
        score = cross_score(m, (15, 15))
        ax.set_title(f"{title}\ncross_score {score:+.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    save(fig, "cross_score.png")


def dead_concept() -> None:
    torch.manual_seed(0)
    stack = nn.Sequential(
        *[nn.Conv2d(1, 1, 3, padding=2, dilation=2, bias=False) for _ in range(3)]
    )
    for c in stack:
        nn.init.ones_(c.weight)
    fixed = nn.Sequential(*stack, nn.Conv2d(1, 1, 3, padding=1, bias=False))
    nn.init.ones_(fixed[3].weight)
    x = torch.randn(1, 1, 25, 25)
    a = em.compute_erf(stack, x, ["2"])["2"]
    b = em.compute_erf(fixed, x, ["3"])["3"]
    fig = Figure(figsize=(7.6, 3.8), dpi=110, layout="constrained")
    for ax, r, title in zip(
        fig.subplots(1, 2), (a, b), ("3x (3x3, dilation 2)", "... + one dense 3x3")
    ):
        m = r.heatmap.numpy().copy()
        shown = np.ma.masked_where(m == 0, m)
        cmap = __import__("matplotlib").colormaps[CMAP].with_extremes(bad="#3cb4e6")
        ax.imshow(shown, cmap=cmap, interpolation="nearest")
        assert r.trf is not None
        (r0, r1), (c0, c1) = r.trf.clipped
        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False,
                               ec="white", lw=1.2))  # fmt: skip
        ax.set_xlim(r0 - 2.5, r1 + 2.5)
        ax.set_ylim(r1 + 2.5, r0 - 2.5)
        ax.set_title(
            f"{title}\ndead_fraction {r.dead_fraction:.2f}, gridding_period {r.gridding_period}",
            fontsize=9,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("blue: exactly zero (dead) pixels; white: clipped TRF", fontsize=9)
    save(fig, "dead_pixels.png")


# ----------------------------------------------------------------------------- fields


def fields() -> None:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50()
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    res = em.compute_erf(resnet, x, ["layer2", "layer3", "layer4"], position="grid:5")
    for name in ("layer2", "layer3", "layer4"):
        field = res[name].field
        assert field is not None
        print(f"resnet50 {name}: border_ratio {field.border_ratio:.3f}")
        fig = field.figure(title=f"resnet50 (random init), {name}, 224 x 224, 8 noise images: "
                                 f"border_ratio {field.border_ratio:.2f}")  # fmt: skip
        save(fig, f"field_resnet50_{name}.png")
    net = dilated_net()
    r = em.compute_erf(net, x, ["7"], position="grid:5")["7"]
    assert r.field is not None
    print(f"dilated net: border_ratio {r.field.border_ratio:.3f}, dead_fraction "
          f"{r.dead_fraction:.3f}, gridding {r.gridding_period}")  # fmt: skip
    fig = r.field.figure(title="4x4 stride-4 stem + 3 x (3x3, dilation 2), random init, 224 x 224: "
                               f"border_ratio {r.field.border_ratio:.2f}")  # fmt: skip
    save(fig, "field_dilated.png")


if __name__ == "__main__":
    border_concept()
    principal_axes_concept()
    cross_concept()
    dead_concept()
    fields()
