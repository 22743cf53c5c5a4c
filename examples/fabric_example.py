"""``em.watch`` on a Lightning Fabric model and optimizer, logging through ``fabric.loggers``.

Run:  python examples/fabric_example.py  [--out runs/fabric]  then
      tensorboard --logdir runs/fabric
"""

from __future__ import annotations

import argparse

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import erf_monitor as em


def main(out: str = "runs/fabric", steps: int = 40) -> em.Watcher:
    fabric = Fabric(accelerator="cpu", devices=1, loggers=TensorBoardLogger(out, name="cnn"))
    fabric.seed_everything(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)  # the wrapped model and optimizer ...
    data = TensorDataset(torch.randn(16 * steps, 3, 32, 32), torch.randint(0, 4, (16 * steps,)))
    loader = fabric.setup_dataloaders(DataLoader(data, batch_size=16, shuffle=True))
    # ... are watched as they are; layer names are those of the model inside.
    watcher = em.watch(
        model, layers=["0", "3", "5"], optimizer=optimizer, logger=fabric.loggers,
        every_n_steps=10, num_samples=8,
    )  # fmt: skip
    for step, (x, y) in enumerate(loader, start=1):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        fabric.log("train/loss", loss.item(), step=step)
    watcher.close()
    for logger in fabric.loggers:
        logger.finalize("success")
    for layer, by_step in watcher.history.items():
        last = by_step[max(by_step)]
        print(f"layer {layer}: ERF {last['erf_size']:.0f}px, coverage {last['coverage']:.1%}")
    return watcher


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/fabric")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    main(args.out, args.steps)
