"""Training overhead of ``ERFMonitor``: the demo's Lightning fit with and without the callback.

Run ``python benchmarks/bench_overhead.py`` (``--quick`` for a smoke run). Both arms train the
demo model (``erf_monitor.cli.demo``: the "large" variant, its data set, Adam, batch 64) for the
same number of steps with the same TensorBoard logger, interleaved over ``--repeats`` runs in
alternating order; the callback arm adds ``ERFMonitor`` with its default settings
(``every_n_steps=500``, ``num_samples=8``; probes at fit start, every 500 steps and at fit
end), watching the demo's layers. Two figures: the wall-time difference of the two arms
(noisy when other processes share the cores) and, within each callback run, the wall time
spent inside the monitor's hooks over the run's wall time (robust to load that changes
between runs). ``--every`` overrides the cadence (the demo itself probes
every ``steps // 10`` steps to make its curves; that worst case is worth a look too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from _overhead import interleaved_arms, print_overhead, time_methods
from torch import nn

_HOOKS = ("setup", "on_train_batch_start", "on_train_batch_end", "on_train_end", "teardown")


def fit(steps: int, every: int | None, seed: int, logdir: str) -> tuple[float, float]:
    """Wall time of one Lightning fit (with ``ERFMonitor`` if ``every`` is not ``None``) and
    the wall time spent inside the monitor's hooks."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from erf_monitor import ERFMonitor
    from erf_monitor.cli.demo import HEAD, LAYERS, brightness_dataset, demo_model

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = demo_model("large")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=3e-3)

    pl.seed_everything(seed, verbose=False)
    loader = DataLoader(
        brightness_dataset(8192, seed=seed),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    callbacks: list[pl.Callback] = []
    spent = [0.0]
    if every is not None:
        layers = [f"net.{n}" for n in LAYERS]
        coverage = {f"net.{HEAD}": 0.15}
        monitor = (
            ERFMonitor(layers=layers, min_coverage=coverage)
            if every <= 0
            else ERFMonitor(layers=layers, min_coverage=coverage, every_n_steps=every)
        )
        time_methods(monitor, _HOOKS, spent)
        callbacks.append(monitor)
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=math.ceil(steps / len(loader)),
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(logdir),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(), loader)
    return time.perf_counter() - t0, spent[0]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=0, help="every_n_steps (0: the default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="20 steps, one repeat (a smoke run)")
    ap.add_argument("--json", help="also write the measurements to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:  # what tests/test_benchmarks.py runs: that it works, not what it costs
        args.steps, args.repeats = 20, 1
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from rich.console import Console

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        warm = min(20, max(1, args.steps // 4))
        fit(warm, None, 0, os.path.join(tmp, "warm"))  # imports, first-call costs
        times, inside = interleaved_arms(
            lambda with_cb, out: fit(args.steps, args.every if with_cb else None, 0, out),
            args.repeats,
            tmp,
        )
    cadence = args.every or 500
    title = f"ERFMonitor overhead: {args.steps} steps, every_n_steps={cadence}"
    med, overhead = print_overhead(console, title, "ERFMonitor's hooks", times, inside)
    report = {
        "args": vars(args),
        "times_s": times,
        "median_s": med,
        "overhead": overhead,
        "hook_share": inside,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
