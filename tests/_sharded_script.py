"""Run by tests/test_sharded.py in 2 CPU processes (gloo); not collected by pytest.

``python _sharded_script.py OUT PORT``: every rank calls ``compute_erf_sharded`` in a few
scenarios and writes ``OUT/rank<r>.pt`` with what it got; the test compares them with a
single-process ``compute_erf``.
"""

from __future__ import annotations

import datetime
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from erf_monitor.core.errors import ERFProbeError
from erf_monitor.probe.sharded import compute_erf_sharded


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),
    )  # fmt: skip


def inputs() -> torch.Tensor:
    return torch.randn(5, 2, 16, 16, generator=torch.Generator().manual_seed(3))  # 3 + 2


class Gated(nn.Module):
    """A 3x3 conv, plus a 7x7 one for the images whose mean is positive: the support of an
    image's map depends on the image."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.small = nn.Conv2d(2, 4, 3, padding=1)
        self.large = nn.Conv2d(2, 4, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = (x.mean((1, 2, 3), keepdim=True) > 0).to(x.dtype)
        return self.small(x) + gate * self.large(x)


def gated_inputs() -> torch.Tensor:
    """Rank 0's images (0-2) have negative means, rank 1's (3-4) positive ones."""
    x = torch.randn(5, 2, 16, 16, generator=torch.Generator().manual_seed(4)).abs()
    return torch.cat([-x[:3], x[3:]])


def small_trf() -> Any:
    """The TRF of the 3x3 path alone: too small for the images that open the 7x7 one."""
    from erf_monitor import theoretical_rf

    return theoretical_rf(nn.Sequential(Gated().small), (2, 16, 16), ["0"])["0"]


def scenarios(rank: int) -> dict[str, Any]:
    model, x = make_model(), inputs()
    out: dict[str, Any] = {}
    for mode in ("luo", "replknet", "openerf"):
        res = compute_erf_sharded(model, x, ["2", "4"], mode=mode)
        out[mode] = {k: r.heatmap for k, r in res.flat().items()}
        out[f"{mode}/n"] = [r.num_samples for r in res.values()]
    res = compute_erf_sharded(model, x, ["4"], keep_per_sample=True, position="corners")
    field = res["4"].field
    assert field is not None
    out["field"] = {k: (r.heatmap, r.per_sample) for k, r in field.items()}

    net = nn.Sequential(Gated())
    gated = compute_erf_sharded(net, gated_inputs(), ["0"], trf={"0": small_trf()})["0"]
    out["gated"] = (gated.trf, gated.trf_issue, gated.heatmap)

    def fail_on_rank_1(m: nn.Module, t: torch.Tensor) -> Any:
        if dist.get_rank() == 1:
            raise RuntimeError("boom on rank 1")
        return m(t)

    try:
        compute_erf_sharded(model, x, ["4"], forward_fn=fail_on_rank_1)
    except ERFProbeError as exc:
        out["one_failed"] = str(exc)
    try:
        compute_erf_sharded(model, x, ["no_such_layer"])
    except ValueError as exc:  # every rank failed alike: the plain error everywhere
        out["all_failed"] = type(exc).__name__
    try:
        compute_erf_sharded(model, x, ["4"], train_mode=True)
    except ValueError as exc:
        out["train_mode"] = str(exc)
    return out


def worker(rank: int, world: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        torch.set_num_threads(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = scenarios(rank)
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out_dir, port = Path(sys.argv[1]), int(sys.argv[2])
    mp.spawn(worker, args=(2, port, out_dir), nprocs=2)
