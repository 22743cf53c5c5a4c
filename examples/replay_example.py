"""The ERF of a run trained without the monitor: replay its checkpoints, open the report.

The demo's small CNN is trained with Lightning and a ``ModelCheckpoint`` callback (no monitor);
``em.replay`` then probes every checkpoint at its step, as a live monitor would have, and
``erf-monitor report`` draws the growth curves and heatmaps.

Run:  python examples/replay_example.py  [--out runs/replay] [--steps 120] [--open]
Same from the command line, once the checkpoints exist:
      erf-monitor replay examples/replay_example.py:make_net runs/replay/checkpoints \\
          --layers blocks.3 head --input-size 128 --channels 1 --out runs/replay/erf
"""

from __future__ import annotations

import argparse
import webbrowser
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

import erf_monitor as em
from erf_monitor.cli.demo import brightness_dataset, demo_model
from erf_monitor.cli.replay import Replay
from erf_monitor.cli.report import build_report


def make_net() -> nn.Module:
    """The network (also the MODEL of the command line above): the demo's dilated CNN, which
    reads its prediction off the centre unit of its head."""
    return demo_model("large")


class BrighterOrDarker(L.LightningModule):
    """The demo's task: is the noise image shifted up or down? Only a large ERF sees enough."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()  # saved as "net.<name>": replay strips the prefix

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main(out: str = "runs/replay", steps: int = 120, open_report: bool = False) -> Replay:
    L.seed_everything(0, verbose=False)
    data = DataLoader(brightness_dataset(steps * 32, seed=0), batch_size=32)
    every = max(1, steps // 4)  # four checkpoints
    ckpt = ModelCheckpoint(Path(out) / "checkpoints", every_n_train_steps=every, save_top_k=-1)
    trainer = L.Trainer(max_steps=steps, callbacks=[ckpt], logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(BrighterOrDarker(), data)  # no ERF monitor: only checkpoints

    # Later: the same probe images for every checkpoint, each probed at its own step.
    probe = torch.randn(8, 1, 128, 128, generator=torch.Generator().manual_seed(1))
    run = em.replay(make_net(), Path(out) / "checkpoints", ["blocks.3", "head"], inputs=probe,
                    out=Path(out) / "erf", min_coverage=0.35)  # fmt: skip
    for layer, by_step in run.history.items():
        sizes = ", ".join(f"{s}: {v['erf_size']:.0f}" for s, v in sorted(by_step.items()))
        print(f"layer {layer}: ERF size (px) by step {sizes}")
    page, _ = build_report(Path(out) / "erf")
    print(f"report: {page}")
    if open_report:
        webbrowser.open(page.resolve().as_uri())
    return run


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/replay")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--open", action="store_true", help="open the report in a browser")
    args = parser.parse_args()
    main(args.out, args.steps, args.open)
