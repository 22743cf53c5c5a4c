"""``erf-monitor demo``: a task that needs a large, centred ERF, and two CNNs that try it.

**Task** ("brighter or darker?"): 128 x 128 single-channel images of unit Gaussian noise,
shifted by a faint ``+0.04`` or ``-0.04`` everywhere; the label is the sign. No pixel tells
on its own (the shift is 4% of the noise): only an average over many pixels does, and the
more pixels the better (a uniform average over a fraction ``f`` of the image has a
signal-to-noise ratio of ``0.04 * 128 * sqrt(f) = 5.1 sqrt(f)``; 99% accuracy needs
``f >= 21%``). The models are fully convolutional and predict from the **centre unit** of their
last feature map, as a segmentation head predicts at one location: the region that unit
averages over is its ERF, and it has to grow, around the centre, for the task to be learned.

**Models**: the same stem (two 3 x 3 convolutions of stride 2, 16 channels) and four residual
blocks (two 3 x 3 convolutions each, the second one zero-initialised as in Goyal et al. 2017)
at 1/4 resolution, then a 1 x 1 head; same number of parameters, only the dilations differ.
At initialisation the blocks are identities, so the ERF is the stem's (7 px) in both.

* ``large``: dilations 1, 2, 4, 8 in the blocks: TRF 247 x 247 px, the whole image. As the
  blocks learn, the ERF grows from 7 px to 115-117 px (coverage from 0.3% to 81-84%;
  seed 0, 200 steps, torch 2.13 CPU / 2.14) and the accuracy from chance to ~99%.
* ``small``: no dilation: TRF 71 x 71 px, at most 31% of the image, whatever the training.
  Its ERF grows too, but stays capped; the coverage alert fires at the first probe (the TRF
  cannot reach the threshold, so there is nothing to wait for) and the accuracy stays lower.

The threshold, ``min_coverage=0.35``, is above what the small TRF allows and well below what
the large model reaches; the patience (``GROW_STEPS = 120`` steps' worth of probes: 6 at the
default probe period of 20 steps) lets the large model's ERF grow past it (it starts at
0.3%, as every ERF that grows during training starts small; it crosses 35% near step 80).
Heatmaps are logged on a log colour scale: the grown ERF is broad but faint next to its
centre pixel.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from erf_monitor.cli.errors import CLIError

if TYPE_CHECKING:
    from rich.console import Console

    from erf_monitor.measure.result import ERFResults

__all__ = [
    "DemoError",
    "VariantResult",
    "brightness_dataset",
    "demo_model",
    "epoch_plan",
    "growth",
    "run_demo",
    "tensorboard_command",
]

IMAGE_SIZE = 128
NUM_CLASSES = 2
#: The faint brightness shift that carries the label (the noise has standard deviation 1).
SHIFT = 0.04
#: Monitored layers (module names of :func:`demo_model`); the float threshold checks the
#: deepest one, :data:`HEAD`.
LAYERS = ("stem", "blocks.1", "blocks.3", "head")
HEAD = "head"
#: See the module docstring.
MIN_COVERAGE = 0.35
#: Training steps the ERF gets to grow past :data:`MIN_COVERAGE` before the alert may fire
#: (the patience in probes is derived from it and the probe period).
GROW_STEPS = 120
DILATIONS = {"small": (1, 1, 1, 1), "large": (1, 2, 4, 8)}
WIDTH = 16


class DemoError(CLIError):
    """A demo option that cannot work (e.g. ``--logger wandb`` without wandb)."""


# ---------------------------------------------------------------------------------- data
class BrightnessDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """The "brighter or darker?" task, generated on the fly (item ``i`` is a pure function of
    ``seed`` and ``i``: no 100 MB tensor held in memory)."""

    def __init__(self, n: int, seed: int, size: int = IMAGE_SIZE, shift: float = SHIFT) -> None:
        self.n, self.seed, self.size, self.shift = n, seed, size, shift

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = torch.randint(0, NUM_CLASSES, (), generator=gen)
        image = torch.randn(1, self.size, self.size, generator=gen)
        return image + (2.0 * label.float() - 1.0) * self.shift, label


def brightness_dataset(
    n: int, seed: int, size: int = IMAGE_SIZE, shift: float = SHIFT
) -> BrightnessDataset:
    """The "brighter or darker?" task: unit noise images shifted by ``+shift`` or ``-shift``.

    Args:
        n: number of images.
        seed: seed of the data (item ``i`` is a pure function of ``seed`` and ``i``).
        size: image side.
        shift: brightness shift carrying the label.

    Returns:
        A dataset of ``(image, label)``: float32 ``(1, size, size)`` and an int64 scalar
        (1: brighter, 0: darker).

    Examples:
        >>> ds = brightness_dataset(8, seed=0, size=32)
        >>> image, label = ds[3]
        >>> tuple(image.shape), int(label) in (0, 1), len(ds)
        ((1, 32, 32), True, 8)
    """
    return BrightnessDataset(n, seed, size, shift)


# ---------------------------------------------------------------------------------- models
class Block(nn.Module):
    """``x + conv2(relu(conv1(relu(x))))`` with dilated 3 x 3 convolutions; ``conv2`` starts
    at zero, so the block starts as the identity."""

    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)
        with torch.no_grad():
            self.conv2.weight.zero_()
            self.conv2.bias.zero_()  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


class CentreReadout(nn.Module):
    """Fully convolutional classifier that predicts from the centre unit of its head."""

    def __init__(self, dilations: tuple[int, ...], width: int = WIDTH) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
        )
        self.blocks = nn.Sequential(*[Block(width, d) for d in dilations])
        self.head = nn.Conv2d(width, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(torch.relu(self.blocks(self.stem(x))))
        h, w = y.shape[-2:]
        return y[:, :, h // 2, w // 2]  # same centre convention as the ERF probe


def demo_model(variant: str, width: int = WIDTH) -> CentreReadout:
    """The ``small`` (no dilation) or ``large`` (dilations 1, 2, 4, 8) demo CNN.

    Examples:
        >>> demo_model("large")(torch.zeros(2, 1, 128, 128)).shape
        torch.Size([2, 2])
    """
    if variant not in DILATIONS:
        raise ValueError(f"variant must be 'small' or 'large', got {variant!r}")
    return CentreReadout(DILATIONS[variant], width)


# ---------------------------------------------------------------------------------- results
@dataclass
class VariantResult:
    """What one demo variant produced."""

    variant: str
    accuracy: float
    seconds: float
    steps: int
    log_dir: Path | None
    results: ERFResults | None
    alerts: dict[str, int] = field(default_factory=dict)
    coverage_warnings: list[str] = field(default_factory=list)
    history: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    test_size: int = 0
    #: The heatmaps as PNG files, ``<layer>/step_<N>.png`` (``None``: none written).
    png_dir: Path | None = None


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info banners ("GPU available: ...") and known harmless warnings."""
    names = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*number of training batches.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _wandb_configured() -> bool:
    import os

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return True
    netrc = Path.home() / ".netrc"
    try:
        return "api.wandb.ai" in netrc.read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return False


def _make_logger(kind: str, out: Path, variant: str) -> tuple[Any, Any]:
    """The Lightning logger for ``kind`` and the extra ERF sinks the report needs."""
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(out), name=variant, default_hp_metric=False), None
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(out), name=variant), None
    if kind == "wandb":
        from erf_monitor.core.imports import package_available

        if not package_available("wandb"):
            raise DemoError("--logger wandb needs wandb: pip install erf-monitor[wandb]")
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(
            project="erf-monitor-demo",
            name=variant,
            save_dir=str(out),
            offline=not _wandb_configured(),
        )
        # W&B keeps its files in its own format: also write the files the report reads.
        return logger, str(out / variant / "erf")
    raise DemoError(f"unknown logger {kind!r}; use tensorboard, wandb or csv")


def _accuracy(model: nn.Module, data: BrightnessDataset) -> float:
    from torch.utils.data import DataLoader

    model.eval()
    right = 0
    with torch.no_grad():
        for x, y in DataLoader(data, batch_size=128):
            right += int((model(x).argmax(1) == y).sum())
    return right / len(data)


def epoch_plan(steps: int, batches: int) -> tuple[int, int]:
    """``(epochs, batches per epoch)`` for ``steps`` optimizer steps from a loader of ``batches``.

    As few epochs as the loader allows, all of the same length, so that the progress bar ends
    full ("200/200", not "200/256"; when ``epochs`` does not divide ``steps`` the last epoch
    stops fewer than ``epochs`` batches short). A run of one epoch (the default: 200 of 256
    batches) trains on exactly the batches it would without the limit.

    Examples:
        >>> epoch_plan(200, 256), epoch_plan(300, 256), epoch_plan(8, 8)
        ((1, 200), (2, 150), (1, 8))
    """
    epochs = math.ceil(steps / batches)
    return epochs, math.ceil(steps / epochs)


def _lightning_module(variant: str) -> Any:
    """The demo's LightningModule: ``demo_model(variant)`` trained with cross-entropy and Adam
    (lr 1e-3), logging its loss and accuracy."""
    import lightning.pytorch as pl

    class DemoModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = demo_model(variant)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self.net(x)
            loss = nn.functional.cross_entropy(logits, y)
            acc = (logits.argmax(1) == y).float().mean()
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/acc", acc, prog_bar=True)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    return DemoModule()


def _monitor(every: int, num_samples: int, sinks: list[Any]) -> Any:
    """The ERFMonitor of a variant: the demo's layers, its coverage threshold and patience."""
    from erf_monitor.integrations.lightning import ERFMonitor

    return ERFMonitor(
        layers=[f"net.{name}" for name in LAYERS],
        every_n_steps=every,
        num_samples=num_samples,
        min_coverage=MIN_COVERAGE,  # a float: checks the deepest watched layer, the head
        patience=max(1, math.ceil(GROW_STEPS / every)),
        render_kwargs={"log_scale": True},
        sinks=sinks,
        summary=False,  # the demo prints its own table for both variants
    )


def _fit(
    module: Any, loader: Any, *, steps: int, logger: Any, callbacks: list[Any], progress: bool
) -> tuple[int, list[str], float]:
    """Train ``module`` for ``steps`` steps on the CPU; returns the steps taken, the coverage
    alerts' texts and the seconds it took (other warnings are issued again)."""
    import lightning.pytorch as pl

    from erf_monitor.core.errors import ERFCoverageWarning

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, _quiet_lightning():
        warnings.simplefilter("always", ERFCoverageWarning)
        epochs, per_epoch = epoch_plan(steps, len(loader))
        trainer = pl.Trainer(
            max_steps=steps,
            max_epochs=epochs,
            limit_train_batches=per_epoch,  # the progress bar ends at N/N, not 200/256
            accelerator="cpu",
            devices=1,
            logger=logger,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            log_every_n_steps=max(1, min(10, steps // 5)),
            num_sanity_val_steps=0,
        )
        trainer.fit(module, loader)
    seconds = time.perf_counter() - t0
    coverage_warnings = [
        str(w.message) for w in caught if issubclass(w.category, ERFCoverageWarning)
    ]
    for w in caught:  # pass the others on (after our filters) so that nothing is swallowed
        if not issubclass(w.category, ERFCoverageWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return int(trainer.global_step), coverage_warnings, seconds


def _train_variant(
    variant: str,
    *,
    out: Path,
    logger_kind: str,
    steps: int,
    every: int,
    num_samples: int,
    train: BrightnessDataset,
    test: BrightnessDataset,
    seed: int,
    progress: bool,
    console: Console,
) -> VariantResult:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    pl.seed_everything(seed, verbose=False)
    module = _lightning_module(variant)
    loader = DataLoader(
        train,
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    logger, extra_sinks = _make_logger(logger_kind, out, variant)
    png_dir = _png_dir(logger_kind, logger, extra_sinks)
    sinks = [] if extra_sinks is None else [extra_sinks]
    if logger_kind == "tensorboard":  # CSV and W&B runs keep PNG files already
        sinks.append(_png_sink(png_dir))
    monitor = _monitor(every, num_samples, sinks)
    callbacks: list[Any] = [monitor]
    if progress:
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar(leave=True))
    console.rule(f"[bold]{variant}[/] variant: {_describe(variant)}")
    done, coverage_warnings, seconds = _fit(
        module, loader, steps=steps, logger=logger, callbacks=callbacks, progress=progress
    )
    for text in coverage_warnings:
        console.print(f"[bold yellow]ERFCoverageWarning[/]: {text}", highlight=False)
    log_dir = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    if logger_kind == "wandb":
        with contextlib.suppress(Exception):
            logger.experiment.finish()
        log_dir = extra_sinks
    return VariantResult(
        variant=variant,
        accuracy=_accuracy(module.net, test),
        test_size=len(test),
        seconds=seconds,
        steps=done,
        log_dir=Path(log_dir) if log_dir else None,
        results=monitor.latest,
        alerts=monitor.alerts,
        coverage_warnings=coverage_warnings,
        history=monitor.history,
        png_dir=png_dir if png_dir.is_dir() else None,
    )


def _png_dir(kind: str, logger: Any, extra_sinks: Any) -> Path:
    """Where a run's heatmaps lie as PNG files: ``heatmaps/<layer>/step_<N>.png`` next to
    its TensorBoard event files, in a CSVLogger's ``erf/`` folder, in W&B's extra files."""
    if kind == "tensorboard":
        return Path(logger.log_dir) / "heatmaps"
    if kind == "csv":
        return Path(logger.log_dir) / "erf" / "heatmaps"
    return Path(extra_sinks) / "heatmaps"


def _png_sink(folder: Path) -> Any:
    """Every logged heatmap also as ``<folder>/<layer>/step_<N>.png`` (FileSink's layout):
    pictures a user can open without TensorBoard."""
    from erf_monitor.sinks import CallableSink, safe_filename
    from erf_monitor.viz.render import save_png

    def write(step: int, _scalars: dict[str, float], images: dict[str, Any]) -> None:
        for key, image in images.items():
            layer = key.removeprefix("erf/").removesuffix("/heatmap")
            save_png(image, folder / safe_filename(layer) / f"step_{step}.png")

    return CallableSink(write)


def _describe(variant: str) -> str:
    return (
        "stem + 4 residual blocks, no dilation (TRF 71x71 of the 128x128 image)"
        if variant == "small"
        else "stem + 4 residual blocks, dilations 1, 2, 4, 8 (TRF 247x247)"
    )


# ---------------------------------------------------------------------------------- summary
def _first_last(res: VariantResult, name: str, key: str) -> tuple[float, float]:
    by_step = res.history.get(name, {})
    if not by_step:
        return math.nan, math.nan
    return by_step[min(by_step)].get(key, math.nan), by_step[max(by_step)].get(key, math.nan)


def growth(res: VariantResult, layer: str = HEAD) -> dict[str, tuple[float, float]]:
    """``{metric: (first probe, last probe)}`` of ``layer`` (ERF size, coverage, ratio)."""
    name = f"net.{layer}"
    keys = ("erf_size", "coverage", "erf_trf_ratio", "sigma_x", "centroid_offset_x")
    return {k: _first_last(res, name, k) for k in keys}


def tensorboard_command(logdir: Path | str) -> str:
    """The command that shows every logged heatmap (TensorBoard keeps 10 images per tag)."""
    return f"tensorboard --logdir {logdir} --samples_per_plugin images=1000"


def _summary(results: list[VariantResult], out: Path, logger_kind: str, console: Console) -> None:
    from rich.markup import escape
    from rich.table import Table

    from erf_monitor.sinks import safe_filename

    table = Table(
        title="erf-monitor demo: brighter or darker? (read out at the centre unit)",
        caption=f"first → last probe; the head is checked against min_coverage {MIN_COVERAGE:.0%}",
        title_justify="left",
        header_style="bold",
    )
    for col, justify in (
        ("variant", "left"),
        ("layer", "left"),
        ("TRF", "right"),
        ("ERF size (px)", "right"),
        ("coverage", "right"),
        ("ERF/TRF", "right"),
        ("alert", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]

    def arrow(a: float, b: float, spec: str) -> str:
        f = lambda v: "n/a" if not math.isfinite(v) else format(v, spec)  # noqa: E731
        return f"{f(a)} → {f(b)}"

    for res in results:
        if res.results is None:
            table.add_row(res.variant, "(no probe)", "", "", "", "", "")
            continue
        for i, (name, r) in enumerate(res.results.items()):
            short = name.removeprefix("net.")
            trf = "?" if r.trf is None else "x".join(str(c) for c in r.trf.clipped_size)
            checked = short == HEAD
            cov = arrow(*_first_last(res, name, "coverage"), ".1%")
            if checked:
                ok = r.coverage >= MIN_COVERAGE
                cov = f"[{'green' if ok else 'bold red'}]{cov}[/]"
            alert = ""
            if name in res.alerts:
                alert = f"[bold red]fired at step {res.alerts[name]}[/]"
            elif checked:
                alert = "[green]none[/]"
            table.add_row(
                f"[bold]{res.variant}[/]" if i == 0 else "",
                escape(short),
                trf,
                arrow(*_first_last(res, name, "erf_size"), ".0f"),
                cov,
                arrow(*_first_last(res, name, "erf_trf_ratio"), ".2f"),
                alert,
                end_section=i == len(res.results) - 1,
            )
    console.print(table)
    acc = Table(
        title=f"Accuracy on {results[0].test_size} held-out images",
        caption="chance level: 50%",
        title_justify="left",
    )
    acc.add_column("variant")
    acc.add_column("accuracy", justify="right")
    acc.add_column("steps", justify="right")
    acc.add_column("train time", justify="right")
    for res in results:
        style = "green" if res.accuracy >= 0.95 else "red"
        acc.add_row(
            res.variant, f"[{style}]{res.accuracy:.1%}[/]", str(res.steps), f"{res.seconds:.0f} s"
        )
    console.print(acc)
    console.print("Logs:", highlight=False)
    for res in results:
        if res.log_dir is not None:
            console.print(f"  {res.variant}: {escape(str(res.log_dir))}", highlight=False)
    for res in results:
        if res.png_dir is not None:
            head = res.png_dir / safe_filename(f"net.{HEAD}")
            steps = [int(p.stem.removeprefix("step_")) for p in head.glob("step_*.png")]
            shown = f"; the head's last: {escape(str(head))}/step_{max(steps)}.png" if steps else ""
            console.print(
                f"  {res.variant} heatmaps as PNG: {escape(str(res.png_dir))}/<layer>/"
                f"step_<N>.png{shown}",
                highlight=False,
            )
    if logger_kind == "tensorboard":
        console.print(
            f"Open them with:  [bold]{escape(tensorboard_command(out))}[/]", highlight=False
        )
        console.print(
            "  (TIME SERIES opens on erf/0_growth, then erf/1_coverage/<layer> ...; "
            "IMAGES: erf/heatmap/<layer>; "
            "--samples_per_plugin images=1000 keeps every probe, not just the last 10 per tag)"
        )
    elif logger_kind == "wandb":
        console.print(
            f"W&B runs are under {escape(str(out / 'wandb'))}; offline runs upload with "
            f"[bold]wandb sync {escape(str(out / 'wandb'))}/offline-run-*[/]",
            highlight=False,
        )
    else:
        console.print(f"CSV/PNG/npz files are under {escape(str(out))}", highlight=False)


def run_demo(
    variant: str = "both",
    out: str | Path = "erf_demo_logs",
    logger: str = "tensorboard",
    *,
    fast: bool = False,
    steps: int | None = None,
    seed: int = 0,
    report: bool = True,
    progress: bool = True,
    threads: int = 1,
    console: Console | None = None,
) -> list[VariantResult]:
    """Train the demo variants with :class:`~erf_monitor.ERFMonitor` and print a summary.

    Args:
        variant: ``"small"``, ``"large"`` or ``"both"``.
        out: log directory.
        logger: ``"tensorboard"``, ``"wandb"`` (offline unless W&B is configured) or ``"csv"``.
        fast: a few steps on a small data set (for tests; accuracies are meaningless).
        steps: training steps per variant (default 200, ``fast``: 8).
        seed: seeds data, initialisation and shuffling.
        report: write ``<out>/erf_report.html`` at the end.
        progress: show Lightning's progress bar.
        threads: torch intra-op threads while training (restored afterwards).
        console: rich console for the output.

    Returns:
        One :class:`VariantResult` per trained variant.
    """
    from rich.console import Console

    console = console or Console()
    if variant not in ("small", "large", "both"):
        raise DemoError(f"variant must be small, large or both, got {variant!r}")
    if logger not in ("tensorboard", "wandb", "csv"):
        raise DemoError(f"unknown logger {logger!r}; use tensorboard, wandb or csv")
    from erf_monitor.core.imports import LIGHTNING_AVAILABLE, package_available

    if not LIGHTNING_AVAILABLE:
        raise DemoError("the demo needs Lightning: pip install erf-monitor[lightning]")
    if logger == "tensorboard" and not package_available("tensorboard"):
        raise DemoError(
            "--logger tensorboard needs tensorboard: pip install erf-monitor[tensorboard]"
        )
    n_steps = steps if steps is not None else (8 if fast else 200)
    if n_steps < 1:
        raise DemoError(f"--steps must be >= 1, got {n_steps}")
    every = max(1, n_steps // (4 if fast else 10))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = brightness_dataset(256 if fast else 8192, seed=seed)
    test = brightness_dataset(64 if fast else 1024, seed=seed + 1)
    variants = ["small", "large"] if variant == "both" else [variant]
    console.print(
        f"[bold]Task[/]: {IMAGE_SIZE}x{IMAGE_SIZE} noise images, all pixels shifted by "
        f"+{SHIFT} or -{SHIFT} (4% of the noise): brighter or darker? Read out at the "
        "[italic]centre unit[/] of the last feature map, which has to average over a large "
        "region around the centre: its ERF must grow. ERFMonitor checks the head against "
        f"min_coverage={MIN_COVERAGE}, giving its ERF {GROW_STEPS} steps to grow.",
        highlight=False,
    )
    results = []
    torch_threads = torch.get_num_threads()
    # These convolutions are too small to gain from intra-op threads, and on a busy machine
    # OpenMP threads spinning against other processes make training ~10x slower.
    torch.set_num_threads(max(1, threads))
    try:
        for v in variants:
            results.append(
                _train_variant(
                    v,
                    out=out,
                    logger_kind=logger,
                    steps=n_steps,
                    every=every,
                    num_samples=4 if fast else 8,
                    train=train,
                    test=test,
                    seed=seed,
                    progress=progress,
                    console=console,
                )
            )
    finally:
        torch.set_num_threads(torch_threads)
    _summary(results, out, logger, console)
    if report:
        from erf_monitor.cli.report import ReportError, build_report

        try:
            path, _ = build_report(out, max_frames=6 if fast else 8)
            console.print(
                f"HTML report: [bold]{escape_path(path)}[/]  (rebuild it with: erf-monitor "
                f"report {escape_path(out)})",
                highlight=False,
            )
        except ReportError as exc:
            console.print(f"[yellow]No HTML report[/]: {exc}")
    return results


def escape_path(path: Path | str) -> str:
    """A path for rich markup."""
    from rich.markup import escape

    return escape(str(path))
