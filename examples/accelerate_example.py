"""``em.watch`` in a Hugging Face Accelerate loop, logging to ``accelerator.trackers``.

The model and optimizer are the ``accelerator.prepare``'d ones; steps are counted on real
optimizer steps only (gradient accumulation: 2 micro-batches per step), and the ERF curves
go to a TensorBoard run of their own, ``<the tracker's log dir>/erf``, beside the loss that
``accelerator.log`` writes (once per optimizer step).

Run:  python examples/accelerate_example.py  [--out runs/accelerate]  then
      tensorboard --logdir runs/accelerate
      (several processes: accelerate launch examples/accelerate_example.py)
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import erf_monitor as em


def main(out: str = "runs/accelerate", steps: int = 40) -> em.Watcher:
    accelerator = Accelerator(
        log_with="tensorboard", project_dir=out, gradient_accumulation_steps=2
    )
    accelerator.init_trackers("erf")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n = 2 * 16 * steps  # 2 micro-batches of 16 per optimizer step
    data = TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 4, (n,)))
    loader = DataLoader(data, batch_size=16, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # Under DDP, every process gets a watcher: with distributed_probe=True they probe
    # their shares together; only the main process writes (accelerator.trackers).
    watcher = em.watch(
        model, layers=["1", "3", "5"], optimizer=optimizer, logger=accelerator,
        every_n_steps=10, num_samples=8, distributed_probe=accelerator.num_processes > 1,
    )  # fmt: skip
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:  # once per optimizer step, not per micro-batch
            accelerator.log({"train/loss": loss.item()}, step=watcher.global_step)
    watcher.close()  # a last probe at the final step, then hooks removed
    accelerator.end_training()
    if accelerator.is_main_process:
        for layer, by_step in watcher.history.items():
            last = by_step[max(by_step)]
            print(f"layer {layer}: ERF {last['erf_size']:.0f}px, coverage {last['coverage']:.1%}")
    return watcher


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/accelerate")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    args = parser.parse_args()
    main(args.out, args.steps)
