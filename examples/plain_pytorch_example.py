"""``em.watch`` in a plain PyTorch loop: the loop itself does not change.

Run:  python examples/plain_pytorch_example.py  [--out runs/plain]  then
      tensorboard --logdir runs/plain --samples_per_plugin images=1000
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import erf_monitor as em


def main(out: str = "runs/plain", steps: int = 30) -> em.Watcher:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = SummaryWriter(out)
    # Steps are counted through the optimizer's step hook; probes use a fixed batch
    # (the first 8 images of the first forward) every 10 steps.
    with em.watch(model, layers=["1", "3", "5"], every_n_steps=10, logger=writer,
                  optimizer=optimizer, num_samples=8) as watcher:  # fmt: skip
        for _ in range(steps):
            images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 4, (32,))
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    writer.close()
    for layer, by_step in watcher.history.items():
        last = by_step[max(by_step)]
        print(f"layer {layer}: ERF {last['erf_size']:.0f}px, coverage {last['coverage']:.1%}")
    return watcher


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/plain")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    main(args.out, args.steps)
