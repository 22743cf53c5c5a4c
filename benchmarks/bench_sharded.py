"""The probe of many images on one process against the same probe sharded over P processes.

Run ``python benchmarks/bench_sharded.py`` (``--quick`` for a smoke run). P processes (gloo,
CPU, one thread each) are started once; every repeat times, interleaved in a rotating order:

* ``1 proc, 1 thread``: ``compute_erf`` on all ``--samples`` images on rank 0 alone;
* ``1 proc, P threads``: the same with ``torch.set_num_threads(P)`` (what one process can do
  with the same cores);
* ``P procs``: ``compute_erf_sharded`` on every rank (each probes ``ceil(N / P)`` images, one
  all-reduce), timed from a barrier to the slowest rank's end.

Only the probe call is timed (the model, the images and the process group exist already). The
maps of the sharded probe are checked against the single-process maps. Medians and their
ratios are printed and optionally written as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

import erf_monitor as em
from erf_monitor.probe.sharded import compute_erf_sharded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30)
    )
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 3, args.size, args.size, generator=gen)
    layers = list(args.layers)
    trf = em.theoretical_rf(model, tuple(x.shape[1:]), layers)  # analysed once, as a monitor
    times: dict[str, list[float]] = {"1 proc, 1 thread": [], f"1 proc, {world} threads": []}
    times[f"{world} procs"] = []
    arms = list(times)
    reference = None
    for rep in range(args.repeats):
        for arm in arms[rep % 3 :] + arms[: rep % 3]:  # rotating order
            dist.barrier()
            t0 = time.perf_counter()
            if arm.endswith("procs"):
                res = compute_erf_sharded(model, x, layers, trf=trf)
            elif rank == 0:
                torch.set_num_threads(1 if arm.endswith("1 thread") else world)
                res = em.compute_erf(model, x, layers, trf=trf)
                torch.set_num_threads(1)
                reference = res if reference is None else reference
            seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            if arm.endswith("procs"):
                dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest rank's end
                if rank == 0 and reference is not None:
                    for name in layers:
                        torch.testing.assert_close(
                            res[name].heatmap, reference[name].heatmap, rtol=1e-4, atol=1e-9
                        )
            times[arm].append(float(seconds))
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--layers", nargs="+", default=["layer2", "layer4"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.samples, args.repeats, args.layers = 32, 3, 1, ["layer1"]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.json")
        mp.spawn(_worker, args=(args.procs, _free_port(), args, out), nprocs=args.procs)
        times = json.loads(Path(out).read_text())
    medians = {arm: statistics.median(v) for arm, v in times.items()}
    base = medians["1 proc, 1 thread"]
    print(
        f"{args.model} {args.layers} at {args.size} px, {args.samples} images, "
        f"{args.repeats} repeats (medians, torch {torch.__version__}, {os.cpu_count()} CPUs):"
    )
    for arm, m in medians.items():
        print(f"  {arm:<18} {m:8.3f} s   x{base / m:5.2f} vs 1 proc, 1 thread")
    report = {"settings": vars(args), "times_s": times, "medians_s": medians}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
