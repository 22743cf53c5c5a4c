"""The distributed probe on a model sharded with FSDP2 (``fully_shard``).

Every rank creates the same watcher; at probe steps every rank probes its share of rank 0's
probe batch (the parameters are all-gathered once for the probe) and one all-reduce sums the
maps. Rank 0 logs. On CPU this runs with gloo; on GPUs with NCCL.

Run:  torchrun --standalone --nproc_per_node 2 examples/fsdp2_example.py [--out runs/fsdp2]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import erf_monitor as em


def main(out: str = "runs/fsdp2", steps: int = 20) -> em.Watcher:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if device is not None:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)),
        nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(32, 32, 3, padding=2, dilation=2), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    ).to(device or "cpu")  # fmt: skip
    for block in model[:3]:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watcher = em.watch(
        model, layers=["0.2", "1.0", "2.0"], optimizer=optimizer, every_n_steps=5,
        num_samples=8, min_coverage={"2.0": 0.05}, logger=out if rank == 0 else None,
    )  # fmt: skip
    g = torch.Generator().manual_seed(rank)  # each rank its own data
    for _ in range(steps):
        x = torch.randn(16, 3, 32, 32, generator=g).to(model[0][0].weight.device)
        y = torch.randint(0, 4, (16,), generator=g).to(x.device)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    watcher.close()
    if rank == 0:
        for layer, by_step in watcher.history.items():
            last = by_step[max(by_step)]
            print(
                f"layer {layer}: ERF {last['erf_size']:.0f}px, coverage {last['coverage']:.1%} "
                f"(probed at steps {sorted(by_step)})"
            )
    dist.destroy_process_group()
    return watcher


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/fsdp2")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    main(args.out, args.steps)
