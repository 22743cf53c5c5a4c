"""``erf-monitor compare``: several models or checkpoints on one probe set, with intervals.

Every model is probed on the **same** images (``keep_per_sample=True``); for every layer and
metric the comparison holds the value with its bootstrap interval over the probe images
(:func:`~erf_monitor.measure.bootstrap.bootstrap_metrics`), and for every model after the first the
paired difference to the first one (:func:`~erf_monitor.measure.bootstrap.paired_differences`: the
same resampled images for both models). Outputs: a figure with the maps side by side and the
difference maps (each map normalised to unit mass, so a difference shows where the ERF's mass
moved), a JSON file with every interval, the raw maps, and a printed table.

Checkpoints are data: ``MODEL@CKPT`` builds MODEL (randomly initialised, seeded) and loads
the state dict in CKPT with ``torch.load(weights_only=True)`` (a Lightning checkpoint's
``state_dict`` too, with the prefix of its keys, e.g. ``model.``, found and stripped).
"""

from __future__ import annotations

import json
import math
import re
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from erf_monitor.cli.errors import CLIError
from erf_monitor.cli.models import ModelSpecError, read_weights, shape_mismatch
from erf_monitor.measure.bootstrap import Interval, compare_intervals

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from erf_monitor.measure.result import ERFResults

__all__ = [
    "Comparison",
    "LineSteps",
    "RichSteps",
    "Steps",
    "compare_models",
    "comparison_figure",
    "comparison_table",
    "fit_state",
    "load_state",
    "split_spec",
    "write_comparison",
]

#: Metrics shown in the table and the figure titles (all metrics are in the JSON).
SHOWN = (("erf_size", ".0f", "ERF size (px)"), ("coverage", ".1%", "coverage"))
_METHOD_NAMES = {"bca": "BCa", "percentile": "percentile"}
SHOWN_EXTRA = (("erf_trf_ratio", ".2f", "ERF/TRF"), ("sigma_x", ".1f", "sigma x (px)"))


class CompareError(CLIError, ValueError):
    """A checkpoint or model that cannot be compared (one line, no traceback in the CLI)."""


class Steps(Protocol):
    """Where :func:`compare_models` reports its steps (a progress display)."""

    def start(self, what: str, total: int | None = None) -> None:
        """A step begins (``total``: units of work, ``None``: unknown)."""

    def advance(self, k: int) -> None:
        """``k`` more units of the current step are done."""

    def done(self) -> None:
        """The current step is finished."""


class RichSteps:
    """:class:`Steps` on a ``rich`` progress display (a bar per step)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: Any = None
        self.total = 1

    def start(self, what: str, total: int | None = None) -> None:
        self.task = self.progress.add_task(what, total=total)
        self.total = total or 1

    def advance(self, k: int) -> None:
        self.progress.advance(self.task, k)

    def done(self) -> None:
        self.progress.update(self.task, total=self.total, completed=self.total)


class LineSteps:
    """:class:`Steps` as one line per finished step (logs, pipes, CI: no live display)."""

    def __init__(self, console: Console) -> None:
        self.console, self.what, self.t0 = console, "", 0.0

    def start(self, what: str, total: int | None = None) -> None:
        self.what, self.t0 = what, time.perf_counter()

    def advance(self, k: int) -> None:
        pass

    def done(self) -> None:
        seconds = time.perf_counter() - self.t0
        self.console.print(f"{self.what}: done in {seconds:.1f} s", highlight=False, markup=False)


_MODEL_FORM = re.compile(r"(torchvision|timm):[\w.\-]+|.+\.py:[A-Za-z_]\w*")


def split_spec(text: str) -> tuple[str, str | None]:
    """``"torchvision:resnet18@run/last.ckpt"`` → ``("torchvision:resnet18", "run/last.ckpt")``.

    The checkpoint starts after the first ``@`` that ends a model spec, so checkpoint names
    may hold ``@`` themselves (Lightning's ``resnet18@epoch=9.ckpt``).

    Examples:
        >>> split_spec("timm:resnet18"), split_spec("m.py:build@w.pt")
        (('timm:resnet18', None), ('m.py:build', 'w.pt'))
        >>> split_spec("torchvision:resnet18@runs/resnet18@epoch=9.ckpt")
        ('torchvision:resnet18', 'runs/resnet18@epoch=9.ckpt')
    """
    at = text.find("@")
    while at > 0:
        if _MODEL_FORM.fullmatch(text[:at]) and at + 1 < len(text):
            return text[:at], text[at + 1 :]
        at = text.find("@", at + 1)
    return text, None


def load_state(model: nn.Module, path: str | Path) -> None:
    """Load a state dict saved at ``path`` into ``model`` (``weights_only=True``, strict).

    Accepts a plain state dict or a checkpoint with a ``"state_dict"`` entry (Lightning);
    when the keys carry a prefix (``model.``, ``net.``...) the one that makes every key of
    ``model`` match is stripped.

    Raises:
        CompareError: unreadable file, keys that do not match the model, or tensors of other
            shapes (a head trained on another number of classes: the message says which
            ``--num-classes`` builds the model with that head).
    """
    path = Path(path)
    try:
        state = read_weights(path)  # data only: pickled code is refused, in one line
    except ModelSpecError as exc:
        raise CompareError(str(exc)) from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CompareError(f"{str(path)!r} holds no state dict")
    fit_state(model, state, path)


def fit_state(model: nn.Module, state: Mapping[str, Any], path: str | Path) -> None:
    """Load the tensors of ``state`` (read from ``path``) into ``model``, strictly: the
    key prefix that makes every key of ``model`` match is stripped (see :func:`load_state`).

    Raises:
        CompareError: keys that do not match the model, or tensors of other shapes.
    """
    wanted = set(model.state_dict())
    prefixes = {""} | {
        k[: -len(w)] for k in state for w in wanted if k.endswith(w) and k != w and k[: -len(w)]
    }
    for prefix in sorted(prefixes, key=len):
        picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if wanted <= set(picked):
            chosen = {k: picked[k] for k in wanted}
            mismatch = shape_mismatch(model, chosen, path)
            if mismatch is not None:  # a raw "size mismatch" traceback otherwise
                raise CompareError(mismatch)
            try:
                model.load_state_dict(chosen, strict=True)
            except RuntimeError as exc:
                text = " ".join(str(exc).split())
                raise CompareError(f"cannot load {str(path)!r} into the model: {text}") from None
            return
    missing = sorted(wanted - set(state))[:3]
    raise CompareError(
        f"{str(path)!r} does not match the model (missing e.g. {missing}); was it saved from "
        "the same architecture?"
    )


@dataclass
class Comparison:
    """What :func:`compare_models` measured."""

    names: list[str]
    layers: list[str]
    results: dict[str, ERFResults]
    #: ``{model: {layer: {metric: Interval}}}``.
    intervals: dict[str, dict[str, dict[str, Interval]]] = field(default_factory=dict)
    #: ``{model: {layer: {metric: Interval of model - first model}}}`` (models after the first).
    differences: dict[str, dict[str, dict[str, Interval]]] = field(default_factory=dict)
    num_samples: int = 0
    n_boot: int = 0
    level: float = 0.95
    method: str = "bca"
    #: Wall time of each step (``"probe <model>"``, ``"bootstrap <layer>"``), seconds.
    seconds: dict[str, float] = field(default_factory=dict)


def compare_models(
    models: Sequence[tuple[str, nn.Module]],
    inputs: torch.Tensor,
    layers: str | Sequence[str],
    *,
    mode: Literal["luo", "replknet", "openerf"] = "luo",
    n_boot: int = 500,
    level: float = 0.95,
    method: str = "bca",
    seed: int = 0,
    chunk_size: int | None = None,
    progress: Steps | None = None,
) -> Comparison:
    """Probe every model on ``inputs`` and bootstrap every metric (see the module docstring).

    Every layer's resamples are drawn once and measured on every model's map
    (:func:`~erf_monitor.measure.bootstrap.compare_intervals`): the same images for the
    intervals of each model and for the paired differences.

    Args:
        models: ``(name, model)`` pairs; the first is the reference of the differences.
        inputs: the probe batch ``(N, C, *S)``, the same for every model.
        layers: layer names or globs present in every model (or ``"auto"``, resolved on the
            first model).
        mode: ``"luo"``, ``"replknet"`` or ``"openerf"``.
        n_boot: bootstrap resamples.
        level: nominal coverage of the intervals.
        method: ``"bca"`` or ``"percentile"``.
        seed: seed of the resampling (the same resamples for every model).
        chunk_size: probe chunk size.
        progress: where to report each probe and bootstrap (:class:`RichSteps`,
            :class:`LineSteps`).

    Returns:
        The :class:`Comparison` (``seconds``: the time of each step).
    """
    from erf_monitor import compute_erf

    if not models:
        raise CompareError("nothing to compare: give at least one model")
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise CompareError(f"model names must differ, got {names}")
    results: dict[str, ERFResults] = {}
    seconds: dict[str, float] = {}
    spec: str | Sequence[str] = layers
    for name, model in models:
        if progress is not None:
            progress.start(f"probing {name}")
        start = time.perf_counter()
        res = compute_erf(
            model,
            inputs,
            spec,
            mode=mode,
            chunk_size=chunk_size,
            keep_per_sample=True,
        )
        seconds[f"probe {name}"] = time.perf_counter() - start
        if progress is not None:
            progress.done()
        results[name] = res
        spec = list(res)  # the next models are probed at exactly these layers
    first = names[0]
    comp = Comparison(
        names=names,
        layers=list(results[first]),
        results=results,
        num_samples=int(inputs.shape[0]),
        n_boot=n_boot,
        level=level,
        method=method,
        seconds=seconds,
    )
    for layer in comp.layers:
        total = n_boot + comp.num_samples + 1  # resamples, leave-one-out maps, the full map
        if progress is not None:
            what = f"bootstrap {layer or '<model>'}: {len(names)} model(s), {n_boot} resamples"
            progress.start(what, total)
        start = time.perf_counter()
        cis, diffs = compare_intervals(
            [results[name][layer] for name in names],
            n_boot=n_boot,
            level=level,
            seed=seed,
            method=method,
            on_batch=progress.advance if progress is not None else None,
        )
        seconds[f"bootstrap {layer}"] = time.perf_counter() - start
        if progress is not None:
            progress.done()
        for name, ci in zip(names, cis):
            comp.intervals.setdefault(name, {})[layer] = ci
        for name, diff in zip(names[1:], diffs):
            comp.differences.setdefault(name, {})[layer] = diff
    return comp


# ---------------------------------------------------------------------------------- output
def _fmt(ci: Interval | None, spec: str) -> str:
    """``153 ± 6`` / ``46.0% ± 3.1%`` / ``+12 ± 4`` (value and half the interval's width)."""
    if ci is None or not math.isfinite(ci.value):
        return "n/a"
    if not math.isfinite(ci.half_width):
        return format(ci.value, spec)
    return f"{ci.value:{spec}} ± {ci.half_width:{spec.lstrip('+')}}"


def _signed(ci: Interval | None, spec: str) -> str:
    text = _fmt(ci, spec if spec.startswith("+") else "+" + spec)
    if ci is not None and math.isfinite(ci.low) and (ci.low > 0 or ci.high < 0):
        return f"[bold]{text}[/]"  # the interval excludes 0
    return text


def comparison_table(comp: Comparison) -> Table:
    """A ``rich`` table: per layer and model, each shown metric with its interval, and the
    difference to the first model (bold when its interval excludes 0)."""
    from rich.markup import escape
    from rich.table import Table

    pct = round(comp.level * 100)
    table = Table(
        title=f"ERF compared on the same {comp.num_samples} probe images "
        f"(value ± half of the {pct}% {_METHOD_NAMES[comp.method]} bootstrap interval, "
        f"{comp.n_boot} resamples)",
        title_justify="left",
        header_style="bold",
    )
    table.add_column("layer", style="cyan", no_wrap=True)
    table.add_column("model", no_wrap=True)
    for _, _, label in SHOWN + SHOWN_EXTRA:
        table.add_column(label, justify="right")
    table.add_column(f"Δ ERF size vs {escape(comp.names[0])}", justify="right")
    table.add_column("Δ coverage", justify="right")
    for layer in comp.layers:
        for i, name in enumerate(comp.names):
            cis = comp.intervals[name][layer]
            diff = comp.differences.get(name, {}).get(layer, {})
            table.add_row(
                escape(layer or "<model>") if i == 0 else "",
                escape(name),
                *[_fmt(cis.get(k), spec) for k, spec, _ in SHOWN + SHOWN_EXTRA],
                _signed(diff.get("erf_size"), ".0f") if diff else "",
                _signed(diff.get("coverage"), ".1%") if diff else "",
                end_section=i == len(comp.names) - 1,
            )
    return table


def _unit_mass(a: np.ndarray) -> np.ndarray:
    total = float(a.sum())
    return a / total if total > 0 else a


def comparison_figure(comp: Comparison, *, log_scale: bool = False, panel: float = 3.0) -> Figure:
    """Maps side by side (one row per layer, one column per model), then the difference of
    each model's unit-mass map to the first one's (red: more mass than the first model)."""
    from matplotlib.figure import Figure

    from erf_monitor.viz.render import (
        add_box,
        colour_caption,
        erf_interval,
        normalize,
        trf_interval,
    )

    n_models = len(comp.names)
    ncols = n_models + (n_models - 1)
    nrows = len(comp.layers)
    fig = Figure(figsize=(panel * ncols * 1.1, panel * nrows * 1.15 + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    first = comp.names[0]
    for row, layer in enumerate(comp.layers):
        maps = {n: comp.results[n][layer].heatmap.double().numpy() for n in comp.names}
        if next(iter(maps.values())).ndim != 2:
            for ax in axes[row]:
                ax.text(0.5, 0.5, "2-D maps only", ha="center", va="center")
                ax.set_axis_off()
            continue
        for col, name in enumerate(comp.names):
            ax = axes[row, col]
            r = comp.results[name][layer]
            ax.imshow(normalize(maps[name], log_scale), cmap="inferno", vmin=0, vmax=1)
            rows, cols = trf_interval(r, 0), trf_interval(r, 1)
            if rows is not None and cols is not None:  # over the frame, where it lies there
                add_box(ax, rows, cols, "cyan", lw=1.0, zorder=3, clip_on=False)
            if maps[name].max() > 0:
                add_box(ax, erf_interval(r, 0), erf_interval(r, 1), "white", lw=1.0, ls="--",
                         zorder=4)  # fmt: skip
            cis = comp.intervals[name][layer]
            ax.set_title(
                f"{name} · {layer or '<model>'}\nERF {_fmt(cis.get('erf_size'), '.0f')} px · "
                f"cov {_fmt(cis.get('coverage'), '.1%')}",
                fontsize=8,
            )
            _pixel_ticks(ax, maps[name].shape)
        ref = _unit_mass(maps[first])
        for k, name in enumerate(comp.names[1:]):
            ax = axes[row, n_models + k]
            diff = _unit_mass(maps[name]) - ref
            vmax = float(np.abs(diff).max()) or 1.0
            if log_scale:  # both signs, three decades each, like the maps' log colour scale
                from matplotlib.colors import SymLogNorm

                norm = SymLogNorm(linthresh=vmax * 1e-3, vmin=-vmax, vmax=vmax)
                im = ax.imshow(diff, cmap="RdBu_r", norm=norm)
            else:
                im = ax.imshow(diff, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            d = comp.differences[name][layer].get("erf_size")
            ax.set_title(f"{name} − {first} (mass share)\nΔ ERF {_fmt(d, '+.0f')} px", fontsize=8)
            _pixel_ticks(ax, diff.shape)
            fig.colorbar(im, ax=ax, shrink=0.75).ax.tick_params(labelsize=6)
    scale = "log" if log_scale else "linear"
    modes = [str(getattr(r, "mode", "")) for res in comp.results.values() for r in res.values()]
    text = (
        f"ERF maps ({scale} colour, each normalised to its maximum; cyan: TRF, white dashed: "
        f"95%-mass square) and differences of the unit-mass maps (red: more mass than "
        f"{first}). ± : half of the {round(comp.level * 100)}% bootstrap interval over "
        f"{comp.num_samples} probe images. "
        + colour_caption(modes, log_scale)
        + " Axes: input pixels."
    )
    fig.suptitle(textwrap.fill(text, max(60, int(ncols * panel * 14))), fontsize=9)
    return fig


def _pixel_ticks(ax: Any, shape: tuple[int, ...]) -> None:
    from erf_monitor.viz.render import nice_ticks

    ax.set_xticks(nice_ticks(shape[1], 3))
    ax.set_yticks(nice_ticks(shape[0], 3))
    ax.tick_params(labelsize=6, length=2, pad=1)


def _interval_record(ci: Interval) -> dict[str, Any]:
    def num(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    return {"value": num(ci.value), "low": num(ci.low), "high": num(ci.high), "std": num(ci.std)}


def write_comparison(
    comp: Comparison,
    out: str | Path,
    *,
    log_scale: bool = False,
    meta: Mapping[str, Any] = {},
    fmt: str = "png",
) -> dict[str, Path]:
    """Write ``compare.<fmt>`` (png, pdf or svg), ``compare.json`` and ``maps.npz``
    (``<model>/<layer>`` arrays) into ``out``; returns their paths."""
    from erf_monitor.sinks import save_npz
    from erf_monitor.viz.export import save_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "figure": out / f"compare.{fmt}",
        "json": out / "compare.json",
        "maps": out / "maps.npz",
    }
    save_figure(comparison_figure(comp, log_scale=log_scale), paths["figure"], dpi=100)
    record: dict[str, Any] = {
        **dict(meta),
        "models": comp.names,
        "num_samples": comp.num_samples,
        "bootstrap": {"n_boot": comp.n_boot, "level": comp.level, "method": comp.method},
        "layers": {},
    }
    for layer in comp.layers:
        record["layers"][layer] = {
            "models": {
                name: {k: _interval_record(ci) for k, ci in comp.intervals[name][layer].items()}
                for name in comp.names
            },
            f"differences_vs_{comp.names[0]}": {
                name: {k: _interval_record(ci) for k, ci in comp.differences[name][layer].items()}
                for name in comp.names[1:]
            },
        }
    paths["json"].write_text(json.dumps(record, indent=2), encoding="utf-8")
    save_npz(
        paths["maps"],
        {
            f"{name}/{layer}": comp.results[name][layer].heatmap.numpy()
            for name in comp.names
            for layer in comp.layers
        },
    )
    return paths
