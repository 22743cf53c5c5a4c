"""Run by tests/test_distributed.py in 2 CPU processes (gloo); not collected by pytest.

``python _distributed_script.py OUT SCENARIO``: every rank writes ``OUT/rank<r>.pt`` with what
the test compares (weights, maps, histories, FSDP flags), or the test fails on the exit code.
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

import erf_monitor as em

LAYERS = ["0.2", "1.0", "1.2"]
N_SAMPLES = 3  # odd: uneven shares over 2 ranks (2 + 1 and a padded copy)


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)),
        nn.Sequential(
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=2,
                                                                          dilation=2)
        ),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )  # fmt: skip


def batches(rank: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as under DDP
    return [
        (torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 4, (4,), generator=g))
        for _ in range(steps)
    ]


def train(model: nn.Module, data: list[Any], watcher_kwargs: dict[str, Any] | None) -> Any:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watcher = None
    if watcher_kwargs is not None:
        watcher = em.watch(model, LAYERS, optimizer=opt, **watcher_kwargs)
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    if watcher is not None:
        watcher.close()
    return watcher


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = full.detach().clone()
    return out


def reference_maps(state: dict[str, torch.Tensor], probe: torch.Tensor) -> dict[str, Any]:
    ref = make_model()
    ref.load_state_dict(state)
    res = em.compute_erf(ref, probe, LAYERS, crop=False)
    return {n: res[n].heatmap for n in LAYERS}


def fsdp_flags(model: nn.Module) -> list[tuple[bool, bool, bool]]:
    from torch.distributed.fsdp import FSDPModule

    return [
        (g.post_forward_mesh_info is None, g.reshard_after_backward, g.reduce_grads)
        for m in model.modules()
        if isinstance(m, FSDPModule)
        for g in m._get_fsdp_state()._fsdp_param_groups
    ]


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])
    fully_shard(model[1])
    fully_shard(model)
    return model


def scenario_fsdp2(rank: int, out: Path) -> dict[str, Any]:
    steps = 4
    data = batches(rank, steps)
    kw = {"every_n_steps": 2, "num_samples": N_SAMPLES, "min_coverage": None, "chunk_size": 1}
    # The same training twice, without and with the monitor: identical weights afterwards.
    plain = shard(make_model())
    train(plain, data, None)
    watched = shard(make_model())
    w = train(watched, data, {**kw, "logger": str(out / "logs") if rank == 0 else None})
    assert w is not None and w.latest is not None
    state = full_state(watched)
    # A probe at the end on the sharded model equals a probe of an unsharded copy.
    probe = w.probe_batch
    assert probe is not None
    maps = {n: w.latest[n].heatmap for n in LAYERS}

    # A failure on one rank only: every rank skips that probe, nobody hangs.
    def fail_on_rank_1(model: nn.Module, x: torch.Tensor) -> Any:
        if dist.get_rank() == 1:
            raise RuntimeError("boom on rank 1")
        return model(x)

    failing = shard(make_model())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f = train(failing, data[:2], {**kw, "forward_fn": fail_on_rank_1})
    assert f is not None
    return {
        "plain": full_state(plain),
        "watched": state,
        "maps": maps,
        "reference": reference_maps(state, probe),
        "probe": probe,
        "history": w.history,
        "trf": {n: w.latest[n].trf for n in LAYERS},
        "flags": (fsdp_flags(plain), fsdp_flags(watched)),
        "failed_history": f.history,
        "failed_latest": f.latest is None,
        "failure_warnings": [str(c.message) for c in caught if "rank(s) [1]" in str(c.message)],
    }


def scenario_ddp(rank: int, out: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    steps = 2
    data = batches(rank, steps)
    model = make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    w = em.watch(
        model, LAYERS, optimizer=opt, every_n_steps=1, num_samples=N_SAMPLES,
        min_coverage=None, distributed_probe=True,
        logger=str(out / "logs") if rank == 0 else None,
    )  # fmt: skip
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    w.close()
    assert w.latest is not None and w.probe_batch is not None
    return {
        "watched": full_state(model),
        "maps": {n: w.latest[n].heatmap for n in LAYERS},
        "reference": reference_maps(full_state(model), w.probe_batch),
        "probe": w.probe_batch,
        "history": w.history,
    }


def scenario_hf_ddp(rank: int, out: Path) -> dict[str, Any]:
    """transformers.Trainer under DDP (it sets the process group up itself)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from transformers import Trainer

    from test_transformers import CONVNEXT_LAYERS, Images, args, convnext

    result: dict[str, Any] = {}
    for option in ("auto", True):
        cb = em.ERFTrainerCallback(
            CONVNEXT_LAYERS, every_n_steps=2, num_samples=3, min_coverage=None,
            distributed_probe=option,  # type: ignore[arg-type]
        )  # fmt: skip
        a = args(out / str(option), report_to=["tensorboard"], max_steps=4, ddp_backend="gloo")
        trainer = Trainer(model=convnext(), args=a, train_dataset=Images(), callbacks=[cb])
        trainer.train()
        assert dist.get_world_size() == 2
        maps = None if cb.latest is None else {n: cb.latest[n].heatmap for n in CONVNEXT_LAYERS}
        ref = None
        if cb.probe_batch is not None:
            ref = em.compute_erf(
                trainer.model, cb.probe_batch, CONVNEXT_LAYERS, crop=False,
                forward_fn=lambda m, x: m(pixel_values=x),
            )  # fmt: skip
        result[str(option)] = {
            "maps": maps,
            "reference": None if ref is None else {n: ref[n].heatmap for n in CONVNEXT_LAYERS},
            "history": cb.history,
        }
    return result


def worker(rank: int, world: int, port: int, out: Path, scenario: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if scenario == "hf_ddp":  # the Trainer (Accelerate) initialises the group from these
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        os.environ.update(LOCAL_WORLD_SIZE=str(world))
        run_scenario(rank, out, scenario)
        return
    # A hang inside a collective becomes an error after this long instead of blocking CI.
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    try:
        run_scenario(rank, out, scenario)
    finally:
        dist.destroy_process_group()


def run_scenario(rank: int, out: Path, scenario: str) -> None:
    torch.set_num_threads(1)
    scenarios = {"fsdp2": scenario_fsdp2, "ddp": scenario_ddp, "hf_ddp": scenario_hf_ddp}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = scenarios[scenario](rank, out)
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    out_dir, name, port = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    mp.spawn(worker, args=(2, port, out_dir, name), nprocs=2)
