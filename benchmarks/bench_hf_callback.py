"""Training overhead of ``ERFTrainerCallback``: a ``transformers.Trainer`` run with and without it.

Run ``python benchmarks/bench_hf_callback.py`` (``--quick`` for a smoke run). Both arms train
the same small ConvNeXt built from a config (3 stages of widths 16/32/64, depths 2/2/2, 64x64
synthetic images, 4 classes, batch 32, AdamW, seed 0) for the same number of steps with
``report_to="tensorboard"``, interleaved over ``--repeats`` runs in alternating order. The
callback arm adds ``ERFTrainerCallback`` at its defaults (``every_n_steps=500``,
``num_samples=8``, ``min_coverage=0.05``; probes at train begin, every 500 steps and at the
end) on one depth-wise convolution per stage. Two figures, as in ``bench_overhead.py``: the
wall-time difference of the two arms (noisy on a shared machine) and, within each callback
run, the wall time spent inside the callback's events over the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from _overhead import interleaved_arms, print_overhead, time_methods

_EVENTS = ("on_train_begin", "on_step_end", "on_train_end", "on_save")
LAYERS = [f"convnext.encoder.stages.{i}.layers.1.dwconv" for i in range(3)]


class _Images(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def train(steps: int, with_callback: bool, out: str) -> tuple[float, float]:
    """Wall time of one ``Trainer.train()`` and the wall time inside the callback's events."""
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        Trainer,
        TrainingArguments,
    )

    import erf_monitor as em

    torch.manual_seed(0)
    cfg = ConvNextConfig(
        num_channels=3, hidden_sizes=[16, 32, 64], depths=[2, 2, 2], num_stages=3,
        num_labels=4, image_size=64,
    )  # fmt: skip
    model = ConvNextForImageClassification(cfg)
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=32, learning_rate=1e-3,
        report_to=["tensorboard"], logging_steps=50, save_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    spent = [0.0]
    callbacks = []
    if with_callback:
        cb = em.ERFTrainerCallback(LAYERS)  # the defaults: every 500 steps, 8 samples
        time_methods(cb, _EVENTS, spent)
        callbacks.append(cb)
    trainer = Trainer(model=model, args=args, train_dataset=_Images(2048, 64), callbacks=callbacks)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return time.perf_counter() - t0, spent[0]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--quick", action="store_true", help="60 steps, one repeat")
    ap.add_argument("--json", help="also write the measurements to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 60, 1
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    from rich.console import Console

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        train(min(20, args.steps), True, os.path.join(tmp, "warm"))  # imports, first calls
        times, inside = interleaved_arms(
            lambda with_cb, out: train(args.steps, with_cb, out), args.repeats, tmp
        )
    title = f"ERFTrainerCallback overhead: {args.steps} steps, defaults"
    med, overhead = print_overhead(console, title, "ERFTrainerCallback's events", times, inside)
    report = {"args": vars(args), "times_s": times, "median_s": med, "overhead": overhead,
              "event_share": inside}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
