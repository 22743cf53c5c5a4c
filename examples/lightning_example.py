"""ERFMonitor in an existing Lightning training: the only change is ``callbacks=[...]``.

Run:  python examples/lightning_example.py  [--out runs/lightning]  then
      tensorboard --logdir runs/lightning --samples_per_plugin images=1000
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import erf_monitor as em


class LitCNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=2, dilation=2), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).mean((2, 3)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images), labels)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main(out: str = "runs/lightning", steps: int = 40) -> em.ERFMonitor:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(256, 3, 32, 32), torch.randint(0, 4, (256,)))
    monitor = em.ERFMonitor(
        layers=["backbone.2", "backbone.5", "backbone.7"],  # names from model.named_modules()
        every_n_steps=10,
        num_samples=8,
        min_coverage=0.05,
    )
    trainer = pl.Trainer(
        max_steps=steps,
        logger=TensorBoardLogger(out, name="cnn"),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(LitCNN(), DataLoader(data, batch_size=32, shuffle=True))
    for layer, by_step in monitor.history.items():
        last = by_step[max(by_step)]
        print(f"{layer}: ERF {last['erf_size']:.0f}px, coverage {last['coverage']:.1%}")
    return monitor


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/lightning")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    main(args.out, args.steps)
