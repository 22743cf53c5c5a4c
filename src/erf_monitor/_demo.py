"""``erf-monitor demo``: a task that needs a large receptive field, and two CNNs that try it.

**Task** ("which corner?"): 32 x 32 single-channel images of Gaussian noise with one bright
3 x 3 square in one of the four corner zones (its centre at least 8 px from the image centre
along both axes). The label is the corner (4 classes). The models are fully convolutional and
predict from the **centre unit** of their last feature map, as a segmentation or detection head
predicts at one location: to be right, that unit has to *see* the corner.

**Models**: the same five 3 x 3 convolutions (16 channels, ReLU) and a 1 x 1 head, same number
of parameters; only stride and dilation differ.

* ``small``: stride 1 everywhere. TRF 11 x 11 around the centre: the corners are out of
  reach whatever the training does; :class:`~erf_monitor.ERFMonitor` warns (its coverage alert
  fires) and the accuracy stays at chance (25%).
* ``large``: strides 2, 2 then dilations 2, 3 (co-prime, so the field has no holes).
  TRF 49 x 49, the whole image; the ERF grows during training and the task is learned.

The coverage threshold is derived from the task: a blob's centre is at least 8 px from the
centre unit along each axis, so to reach the nearest blob pixels the 95%-mass square must be
at least 13 px wide (2 * 6 + 1), 16.5% of the 32 x 32 image; the demo alerts below 15%.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from rich.console import Console

    from erf_monitor._result import ERFResults

__all__ = [
    "DemoError",
    "VariantResult",
    "corner_dataset",
    "demo_model",
    "run_demo",
]

IMAGE_SIZE = 32
NUM_CLASSES = 4
#: Monitored layers (module names of :func:`demo_model`); the alert checks :data:`HEAD`.
LAYERS = ("features.conv1", "features.conv3", "features.conv5", "head")
HEAD = "head"
#: Derived from the task geometry, see the module docstring.
MIN_COVERAGE = 0.15
_ZONE = (2, 7)  # blob centres lie in [2, 7] or [size-1-7, size-1-2] along each axis


class DemoError(Exception):
    """A demo option that cannot work (e.g. ``--logger wandb`` without wandb)."""


# ---------------------------------------------------------------------------------- data
def corner_dataset(
    n: int, seed: int, size: int = IMAGE_SIZE, noise: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """The "which corner?" task: noise images with a bright 3 x 3 square in one corner zone.

    Args:
        n: number of images.
        seed: seed of the generator (the data is a pure function of ``n``, ``seed``, ``size``).
        size: image side.
        noise: standard deviation of the Gaussian background.

    Returns:
        ``(images, labels)``: float32 ``(n, 1, size, size)`` and int64 ``(n,)`` with
        0 = top-left, 1 = top-right, 2 = bottom-left, 3 = bottom-right.

    Examples:
        >>> x, y = corner_dataset(8, seed=0)
        >>> x.shape, y.shape, int(y.max()) < 4
        (torch.Size([8, 1, 32, 32]), torch.Size([8]), True)
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    lo, hi = _ZONE
    offset = torch.randint(lo, hi + 1, (n, 2), generator=gen)
    bottom = (labels // 2).bool()
    right = (labels % 2).bool()
    rows = torch.where(bottom, size - 1 - offset[:, 0], offset[:, 0])
    cols = torch.where(right, size - 1 - offset[:, 1], offset[:, 1])
    images = noise * torch.randn(n, 1, size, size, generator=gen)
    grid = torch.arange(size)
    in_rows = (grid[None, :] - rows[:, None]).abs() <= 1  # (n, size)
    in_cols = (grid[None, :] - cols[:, None]).abs() <= 1
    blob = (in_rows[:, :, None] & in_cols[:, None, :]).float()  # (n, size, size)
    images[:, 0] += 3.0 * blob
    return images, labels


# ---------------------------------------------------------------------------------- models
class CentreReadout(nn.Module):
    """Fully convolutional classifier that predicts from the centre unit of its head."""

    def __init__(self, features: nn.Sequential, head: nn.Conv2d) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.features(x))
        h, w = y.shape[-2:]
        return y[:, :, h // 2, w // 2]  # same centre convention as the ERF probe


def demo_model(variant: str, width: int = 16) -> CentreReadout:
    """The ``small`` (stride 1) or ``large`` (strided + dilated) demo CNN.

    Examples:
        >>> demo_model("small")(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 4])
    """
    if variant == "small":
        cfg = [(1, 1), (1, 1), (1, 1), (1, 1), (1, 1)]  # (stride, dilation)
    elif variant == "large":
        cfg = [(1, 1), (2, 1), (2, 1), (1, 2), (1, 3)]  # co-prime dilations: no gaps
    else:
        raise ValueError(f"variant must be 'small' or 'large', got {variant!r}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    cin = 1
    for i, (stride, dilation) in enumerate(cfg, 1):
        layers[f"conv{i}"] = nn.Conv2d(
            cin, width, 3, stride=stride, padding=dilation, dilation=dilation
        )
        layers[f"relu{i}"] = nn.ReLU()
        cin = width
    return CentreReadout(nn.Sequential(layers), nn.Conv2d(width, NUM_CLASSES, 1))


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
        from erf_monitor._imports import package_available

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


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xb).argmax(1) for xb in x.split(512)])
    return float((pred == y).float().mean())


def _train_variant(
    variant: str,
    *,
    out: Path,
    logger_kind: str,
    steps: int,
    every: int,
    num_samples: int,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    seed: int,
    progress: bool,
    console: Console,
) -> VariantResult:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from erf_monitor._errors import ERFCoverageWarning
    from erf_monitor.integrations.lightning import ERFMonitor

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
            return torch.optim.Adam(self.parameters(), lr=3e-3)

    pl.seed_everything(seed, verbose=False)
    module = DemoModule()
    loader = DataLoader(
        TensorDataset(*train),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    logger, extra_sinks = _make_logger(logger_kind, out, variant)
    monitor = ERFMonitor(
        layers=[f"net.{name}" for name in LAYERS],
        every_n_steps=every,
        num_samples=num_samples,
        min_coverage={f"net.{HEAD}": MIN_COVERAGE},
        sinks=extra_sinks,
    )
    callbacks: list[Any] = [monitor]
    if progress:
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar(leave=True))
    console.rule(f"[bold]{variant}[/] variant: {_describe(variant)}")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, _quiet_lightning():
        warnings.simplefilter("always", ERFCoverageWarning)
        trainer = pl.Trainer(
            max_steps=steps,
            max_epochs=math.ceil(steps / len(loader)),
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
    for text in coverage_warnings:
        console.print(f"[bold yellow]ERFCoverageWarning[/]: {text}", highlight=False)
    log_dir = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    if logger_kind == "wandb":
        with contextlib.suppress(Exception):
            logger.experiment.finish()
        log_dir = extra_sinks
    return VariantResult(
        variant=variant,
        accuracy=_accuracy(module.net, *test),
        seconds=seconds,
        steps=int(trainer.global_step),
        log_dir=Path(log_dir) if log_dir else None,
        results=monitor.latest,
        alerts=monitor.alerts,
        coverage_warnings=coverage_warnings,
        history=monitor.history,
    )


def _describe(variant: str) -> str:
    return (
        "five 3x3 convs, stride 1 (TRF 11x11 of the 32x32 image)"
        if variant == "small"
        else "five 3x3 convs, strides 2, 2 then dilations 2, 3 (TRF 49x49)"
    )


# ---------------------------------------------------------------------------------- summary
def _summary(results: list[VariantResult], out: Path, logger_kind: str, console: Console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title="erf-monitor demo: which corner holds the blob? (read out at the centre unit)",
        title_justify="left",
        header_style="bold",
    )
    for col, justify in (
        ("variant", "left"),
        ("layer", "left"),
        ("TRF (clipped)", "right"),
        ("ERF 95%", "right"),
        ("ERF/TRF", "right"),
        ("coverage", "right"),
        ("alert", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for res in results:
        if res.results is None:
            table.add_row(res.variant, "(no probe)", "", "", "", "", "")
            continue
        for i, (name, r) in enumerate(res.results.items()):
            short = name.removeprefix("net.")
            trf = "?" if r.trf is None else "x".join(str(c) for c in r.trf.clipped_size)
            checked = short == HEAD
            cov = f"{r.coverage:.1%}"
            if checked:
                ok = r.coverage >= MIN_COVERAGE
                cov = f"[{'green' if ok else 'bold red'}]{cov}[/] (min {MIN_COVERAGE:.0%})"
            alert = ""
            if name in res.alerts:
                alert = f"[bold red]fired at step {res.alerts[name]}[/]"
            elif checked:
                alert = "[green]none[/]"
            ratio = "n/a" if not math.isfinite(r.ratio) else f"{r.ratio:.2f}"
            table.add_row(
                f"[bold]{res.variant}[/]" if i == 0 else "",
                escape(short),
                trf,
                str(r.erf_size),
                ratio,
                cov,
                alert,
                end_section=i == len(res.results) - 1,
            )
    console.print(table)
    acc = Table(
        title="Accuracy on 1024 held-out images", caption="chance level: 25%", title_justify="left"
    )
    acc.add_column("variant")
    acc.add_column("accuracy", justify="right")
    acc.add_column("steps", justify="right")
    acc.add_column("train time", justify="right")
    for res in results:
        style = "green" if res.accuracy >= 0.6 else "red"
        acc.add_row(
            res.variant, f"[{style}]{res.accuracy:.1%}[/]", str(res.steps), f"{res.seconds:.0f} s"
        )
    console.print(acc)
    console.print("Logs:", highlight=False)
    for res in results:
        if res.log_dir is not None:
            console.print(f"  {res.variant}: {escape(str(res.log_dir))}", highlight=False)
    if logger_kind == "tensorboard":
        console.print(
            f"Open them with:  [bold]tensorboard --logdir {escape(str(out))}[/]", highlight=False
        )
        console.print("  (SCALARS: erf/<layer>/coverage ...; IMAGES: erf/<layer>/heatmap)")
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
        steps: training steps per variant (default 150, ``fast``: 8).
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
    from erf_monitor._imports import _LIGHTNING_AVAILABLE, package_available

    if not _LIGHTNING_AVAILABLE:
        raise DemoError("the demo needs Lightning: pip install erf-monitor[lightning]")
    if logger == "tensorboard" and not package_available("tensorboard"):
        raise DemoError(
            "--logger tensorboard needs tensorboard: pip install erf-monitor[tensorboard]"
        )
    n_steps = steps if steps is not None else (8 if fast else 150)
    if n_steps < 1:
        raise DemoError(f"--steps must be >= 1, got {n_steps}")
    every = max(1, n_steps // (4 if fast else 10))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = corner_dataset(512 if fast else 8192, seed=seed)
    test = corner_dataset(1024, seed=seed + 1)
    variants = ["small", "large"] if variant == "both" else [variant]
    console.print(
        "[bold]Task[/]: 32x32 noise images with a bright 3x3 blob in one corner zone; predict the "
        "corner from the [italic]centre unit[/] of the last feature map. The blob is at least 8 "
        f"px from the centre, so the ERF must cover >= {MIN_COVERAGE:.0%} of the image "
        "(ERFMonitor's min_coverage for the head).",
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
        from erf_monitor._report import ReportError, build_report

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
