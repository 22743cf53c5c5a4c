"""Make the pictures of docs/concepts.md and docs/index.md (into docs/img/concepts/).

Every picture is computed with erf-monitor itself on small random-init models (no weights, no
data downloads). Run from the repository root:

    python docs/scripts/make_concept_figures.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

import erf_monitor as em
from erf_monitor.viz.render import erf_figure

OUT = Path(__file__).resolve().parents[1] / "img" / "concepts"
CMAP = "inferno"


def save(fig: Figure, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    fig.savefig(path, dpi=fig.dpi)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def relu_stack(depth: int, channels: int = 16, seed: int = 0, **conv_kw) -> nn.Sequential:
    """``depth`` random 3x3 convs (Kaiming normal, no bias) with ReLU in between."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        conv = nn.Conv2d(1 if i == 0 else channels, channels, 3, bias=False, **conv_kw)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        layers += [conv, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def show(ax, heat, title: str, log: bool = False) -> None:  # type: ignore[no-untyped-def]
    a = np.asarray(heat, dtype=float)
    a = a / a.max()
    if log:
        a = np.log10(1 + a / 1e-3) / np.log10(1 + 1e3)
    ax.imshow(a, cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def box(ax, rows, cols, color, **kw) -> None:  # type: ignore[no-untyped-def]
    ax.add_patch(
        Rectangle(
            (cols[0] - 0.5, rows[0] - 0.5),
            cols[1] - cols[0] + 1,
            rows[1] - rows[0] + 1,
            fill=False,
            edgecolor=color,
            lw=1.5,
            **kw,
        )
    )


def square(r: em.ERFResult, t: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """Inclusive row/column ranges of the t-mass square, cut at the input border."""
    side = r.mass_extent(t)
    h = side // 2
    shape = r.heatmap.shape
    return tuple(  # type: ignore[return-value]
        (max(c - h, 0), min(c + h, s - 1)) for c, s in zip(r.centre_pixel, shape)
    )


def hero() -> None:
    """index.md: a random-init ResNet-18, one panel per stage."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    x = torch.randn(8, 3, 224, 224)
    res = em.compute_erf(model, x, layers=["layer1", "layer2", "layer3", "layer4"])
    fig = erf_figure(res, ncols=2, panel_size=3.6)
    save(fig, "resnet18.png")
    for name, r in res.items():
        print(f"  resnet18 {name}: {r}")


def erf_map() -> None:
    model = relu_stack(8)
    x = torch.randn(16, 1, 33, 33, generator=torch.Generator().manual_seed(1))
    r = em.compute_erf(model, x, layers=["14"], keep_per_sample=True)["14"]
    fig = Figure(figsize=(6.6, 2.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3)
    show(axes[0], x[0, 0].numpy() - x[0, 0].numpy().min(), "one input sample x[0]")
    axes[0].images[0].set_cmap("gray")
    show(axes[1], r.per_sample[0].numpy(), "|gradient| of sample 0")
    show(axes[2], r.heatmap.numpy(), f"ERF map: mean of {r.num_samples} samples")
    for ax in axes[1:]:
        c = r.centre_pixel
        ax.plot(c[1], c[0], "c+", ms=10, mew=1.5)
    fig.suptitle("8 random 3×3 conv + ReLU layers, 33×33 input (cyan +: centre pixel)", fontsize=9)
    save(fig, "erf_map.png")


def modes() -> None:
    model = relu_stack(8)
    x = torch.randn(16, 1, 33, 33, generator=torch.Generator().manual_seed(1))
    fig = Figure(figsize=(7.5, 2.8), dpi=100, layout="constrained")
    for ax, mode in zip(fig.subplots(1, 3), ("luo", "replknet", "openerf")):
        r = em.compute_erf(model, x, layers=["14"], mode=mode)["14"]  # type: ignore[arg-type]
        title = f'mode="{mode}"\nm(0.5) = {r.mass_extent(0.5)}, m(0.95) = {r.erf_size}'
        show(ax, r.heatmap.numpy(), title)
    save(fig, "modes.png")


def trf() -> None:
    # 12 layers of 3x3: TRF 25 px; a 20 px input cuts it at both ends.
    model = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1, bias=False) for _ in range(12)])
    for conv in model:
        nn.init.constant_(conv.weight, 1 / 9)
    x = torch.randn(1, 1, 20, 20)
    r = em.compute_erf(model, x, layers=["11"])["11"]
    t = r.trf
    (ys, ye), (xs, xe) = t.interval
    fig = Figure(figsize=(4.4, 3.9), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.set_facecolor("0.82")  # outside the input: zero padding
    show(ax, r.heatmap.numpy(), "")
    ax.add_patch(
        Rectangle(
            (xs - 0.5, ys - 0.5), xe - xs + 1, ye - ys + 1, fill=False, ec="tab:blue", ls=":", lw=2
        )
    )
    box(ax, t.clipped[0], t.clipped[1], "cyan")
    ax.set_xlim(xs - 1.5, xe + 1.5)
    ax.set_ylim(ye + 1.5, ys - 1.5)
    ax.text(xs + 0.5, ye + 0.3, "padding (outside the input)", fontsize=7, color="0.2")
    ax.set_title(
        f"12 × (3×3 conv), 20×20 input: TRF size {int(t.size[0])}, stride {t.stride[0]:g}\n"
        f"interval {tuple(int(v) for v in t.interval[0])} (blue dotted), "
        f"clipped {t.clipped[0]} (cyan)",
        fontsize=8.5,
    )
    save(fig, "trf.png")


def mass_extent() -> None:
    model = relu_stack(10)
    x = torch.randn(16, 1, 41, 41, generator=torch.Generator().manual_seed(2))
    r = em.compute_erf(model, x, layers=["18"])["18"]
    fig = Figure(figsize=(7.4, 3.2), dpi=100, layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[1, 1.3])
    show(ax, r.heatmap.numpy(), "centred squares, odd sides (zoomed)")
    colors = {0.2: "lime", 0.5: "deepskyblue", 0.95: "white"}
    for t, col in colors.items():
        rows, cols = square(r, t)
        box(ax, rows, cols, col, label=f"m({t:g}) = {r.mass_extent(t)}")
    cy, cx = r.centre_pixel
    ax.set_xlim(cx - 12.5, cx + 12.5)
    ax.set_ylim(cy + 12.5, cy - 12.5)
    ax.legend(fontsize=7, loc="lower right", facecolor="0.1", labelcolor="white", framealpha=0.9)
    heat = r.heatmap.double().numpy()
    sides, fracs = [], []
    for i in range(0, 21):
        sl = heat[max(cy - i, 0) : cy + i + 1, max(cx - i, 0) : cx + i + 1]
        sides.append(2 * i + 1)
        fracs.append(sl.sum() / heat.sum())
    ax2.plot(sides, fracs, "o-", ms=3, color="k", lw=1, label="mass inside the square")
    for t, col in colors.items():
        m = r.mass_extent(t)
        c = "tab:red" if col == "white" else ("tab:green" if col == "lime" else "tab:blue")
        ax2.axhline(t, color=c, lw=1, ls="--")
        ax2.axvline(m, color=c, lw=1)
        ax2.text(m + 0.4, t - 0.07, f"m({t:g}) = {m}", fontsize=7.5, color=c)
    ax2.set_xlabel("side 2i + 1 of the centred square (px), i = 0, 1, 2, ...", fontsize=8)
    ax2.set_ylabel("fraction of the ERF mass inside", fontsize=8)
    ax2.set_ylim(0, 1.02)
    ax2.tick_params(labelsize=7)
    ax2.grid(alpha=0.3)
    ax2.set_title("m(t): first side whose mass exceeds t", fontsize=9)
    save(fig, "mass_extent.png")


def coverage() -> None:
    fig = Figure(figsize=(7.2, 2.9), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, depth, size in ((axes[0], 6, 64), (axes[1], 24, 64)):
        model = relu_stack(depth, padding=1)
        x = torch.randn(8, 1, size, size, generator=torch.Generator().manual_seed(3))
        layer = str(2 * depth - 2)
        r = em.compute_erf(model, x, layers=[layer])[layer]
        show(ax, r.heatmap.numpy(), "")
        box(ax, r.trf.clipped[0], r.trf.clipped[1], "cyan")
        rows, cols = square(r, 0.95)
        box(ax, rows, cols, "white", ls="--")
        ax.set_title(
            f"{depth} layers: TRF {max(r.trf.clipped_size)} (cyan), ERF size {r.erf_size}\n"
            f"ratio {r.ratio:.2f}, coverage {r.erf_size}²/{size}² = {r.coverage:.1%}",
            fontsize=8.5,
        )
    save(fig, "coverage.png")


def sigma_r2() -> None:
    fig = Figure(figsize=(7.4, 2.8), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    cases = (
        ("6 × (3×3 all-ones conv)", [nn.Conv2d(1, 1, 3, padding=1, bias=False) for _ in range(6)]),
        ("one 11×11 all-ones conv", [nn.Conv2d(1, 1, 11, padding=5, bias=False)]),
    )
    for ax, (label, convs) in zip(axes, cases):
        model = nn.Sequential(*convs)
        for c in model:
            nn.init.constant_(c.weight, 1.0)
        x = torch.randn(1, 1, 31, 31)
        layer = str(len(convs) - 1)
        r = em.compute_erf(model, x, layers=[layer])[layer]
        heat = r.heatmap.double().numpy()
        cy, cx = r.centre_pixel
        prof = heat[cy] / heat[cy].max()
        xs = np.arange(heat.shape[1]) - cx
        sx = r.sigma[1]
        fine = np.linspace(xs[0], xs[-1], 300)
        ax.bar(xs, prof, width=1.0, color="tab:orange", alpha=0.6, label="ERF, centre row")
        ax.plot(
            fine, np.exp(-(fine**2) / (2 * sx**2)), "k", lw=1.2, label="moment-matched Gaussian"
        )
        ax.axvspan(-sx, sx, color="tab:blue", alpha=0.12, label=f"±σ, σ = {sx:.2f} px")
        ax.set_xlim(-12, 12)
        ax.set_ylim(0, 1.55)
        ax.set_title(f"{label}: R² = {r.gaussian_r2:.3f}", fontsize=9)
        ax.set_xlabel("x − centre (px)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6.5, loc="upper left", frameon=False)
    save(fig, "sigma_r2.png")


def centroid_offset() -> None:
    # Kernels that weigh their right column most (as a trained layer might): each layer
    # shifts the mass right by (1.0 - 0.25) / 1.75 px, the TRF stays symmetric.
    model = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1, bias=False) for _ in range(6)])
    kernel = torch.outer(torch.ones(3), torch.tensor([0.25, 0.5, 1.0]))
    with torch.no_grad():
        for conv in model:
            conv.weight.copy_(kernel.view(1, 1, 3, 3))
    x = torch.randn(1, 1, 21, 21)
    r = em.compute_erf(model, x, layers=["5"])["5"]
    fig = Figure(figsize=(3.8, 3.8), dpi=100, layout="constrained")
    ax = fig.subplots()
    show(ax, r.heatmap.numpy(), "")
    ty, tx = r.theoretical_centre
    cy, cx = r.centroid
    box(ax, r.trf.clipped[0], r.trf.clipped[1], "cyan", label="TRF")
    ax.plot(tx, ty, "c+", ms=14, mew=2, label="theoretical centre")
    ax.plot(cx, cy, "wx", ms=10, mew=2, label="centroid")
    ax.legend(fontsize=7, loc="lower left", facecolor="0.1", labelcolor="white")
    dy, dx = r.centroid_offset
    ax.set_title(
        f"6 × 3×3 conv, columns weighted 1 : 2 : 4\n"
        f"centroid offset (y, x) = ({dy:+.2f}, {dx:+.2f}) px",
        fontsize=9,
    )
    save(fig, "centroid_offset.png")


def centre_unit() -> None:
    fig = Figure(figsize=(6.4, 2.9), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (n, label) in zip(axes, ((7, "odd: H' = 7"), (8, "even: H' = 8"))):
        grid = np.zeros((n, n))
        c = n // 2
        grid[c, c] = 1.0
        if n % 2 == 0:
            for i, j in ((c - 1, c - 1), (c - 1, c), (c, c - 1)):
                grid[i, j] = 0.35
        ax.imshow(grid, cmap="Oranges", vmin=0, vmax=1.2)
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.tick_params(labelsize=7, length=0)
        ax.set_xticks(np.arange(-0.5, n), minor=True)
        ax.set_yticks(np.arange(-0.5, n), minor=True)
        ax.grid(which="minor", color="0.6", lw=0.6)
        ax.text(c, c, f"({c},{c})", ha="center", va="center", fontsize=6.5, color="white")
        ax.set_title(f"{label}: centre unit ({c}, {c})", fontsize=9)
    save(fig, "centre_unit.png")


def main() -> None:
    torch.set_grad_enabled(True)
    for make in (
        hero,
        erf_map,
        modes,
        trf,
        mass_extent,
        coverage,
        sigma_r2,
        centroid_offset,
        centre_unit,
    ):
        make()


if __name__ == "__main__":
    main()
