"""Probing on every rank together: process-group helpers, sharding, shares and gathering.

The monitor's distributed probe (:mod:`erf_monitor.monitor.ranks`) builds on these: each
rank probes its share of the probe batch, then one all-reduce.

Why: under FSDP2 (``fully_shard``) a forward all-gathers parameters, so every rank must take
part in every forward and "rank 0 probes alone" waits forever. Under DDP, splitting the probe
over the ranks is a speed-up (``distributed_probe=True``).

Everything that decides how many collectives a rank runs must be the same on every rank, or a
rank waits forever for the others. How each one is made the same:

* **Probe batch**: rank 0's, broadcast at every probe (ranks that captured nothing, or
  something else, use it).
* **Layers and TRFs**: every rank runs the analysis (it may run forwards) and rank 0's result
  is broadcast; when rank 0's fails, every rank turns the monitor off.
* **Forwards and backwards**: every rank gets ``ceil(N / world)`` samples (the last shares are
  padded with copies whose maps are dropped), so chunks are the same everywhere; sharded
  models are probed on the full input (no cropping: its fallback depends on gradient values).
* **FSDP2**: the probe first all-gathers every ``fully_shard`` module (the same modules in the
  same order on every rank) and keeps the parameters gathered for its whole duration (no
  reshard after forward/backward, no gradient sync), so its own forwards and backwards run no
  collective at all: a rank whose probe fails cannot leave the others waiting inside one.
  Afterwards ``reset_iter_state()`` reshards and clears FSDP's per-iteration state, and the
  flags are restored, so training goes on exactly as without the probe.
* **Failures**: the one all-reduce carries a failure flag per rank next to the maps; if any
  rank failed, every rank skips the probe (and reports it).

Maps are summed raw (:func:`~erf_monitor.measure.metrics.finalise_map` turns the sum over all
samples into the published map, once); rank 0 logs, the other ranks get the same results.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from erf_monitor.core.errors import ERFProbeError

__all__ = [
    "agree",
    "all_ranks_probe",
    "any_rank",
    "broadcast_object",
    "comm_device",
    "gathered_parameters",
    "process_group",
    "rank_and_world",
    "refusal",
    "sharding",
    "share",
    "sum_and_flag_failures",
]

Sharding = Literal["fsdp2", "fsdp1", "dtensor", "deepspeed"]

log = logging.getLogger("erf_monitor")


def process_group() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    dist = process_group()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def sharding(model: nn.Module) -> Sharding | None:
    """How the parameters of ``model`` are sharded, ``None`` if they are not.

    ``"fsdp2"``: ``fully_shard`` modules whose parameters are sharded over the data-parallel
    ranks only (a 1-D mesh, or HSDP's replicate x shard mesh, spanning every rank); ``"fsdp1"``:
    ``FullyShardedDataParallel``; ``"dtensor"``: DTensor parameters on other meshes (tensor
    parallelism...); ``"deepspeed"``: ZeRO-3 partitioned parameters.
    """
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.distributed.tensor import DTensor, Replicate
    except ImportError:  # pragma: no cover - torch without distributed support
        return None
    world = rank_and_world()[1]
    fsdp2 = fsdp1 = False
    for m in model.modules():
        fsdp2 = fsdp2 or isinstance(m, FSDPModule)
        fsdp1 = fsdp1 or isinstance(m, FullyShardedDataParallel)
    if fsdp1:
        return "fsdp1"
    data_parallel_only = True
    any_dtensor = False
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            return "deepspeed"
        if isinstance(p, DTensor):
            any_dtensor = True
            mesh, placements = p.device_mesh, p.placements
            hsdp = mesh.ndim == 2 and isinstance(placements[0], Replicate)
            over_all_ranks = mesh.size() == world  # every rank is a data-parallel rank
            data_parallel_only = data_parallel_only and (mesh.ndim == 1 or hsdp) and over_all_ranks
    if fsdp2 and data_parallel_only:
        return "fsdp2"
    return "dtensor" if (fsdp2 or any_dtensor) else None


def all_ranks_probe(model: nn.Module, option: bool | str = "auto") -> bool:
    """Whether every rank must run the probe: sharded parameters, or ``option=True`` with
    several ranks. Sharded models always take this path (also to be refused on every rank)."""
    if process_group() is None:
        return False
    if sharding(model) is not None:
        return True
    return option is True and rank_and_world()[1] > 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a process group)."""
    dist = process_group()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (for decisions only rank 0 can take, e.g. alerts)."""
    return bool(broadcast_object(bool(flag)))


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (one all-reduce; ``flag`` without a group)."""
    dist = process_group()
    if dist is None or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=comm_device())
    dist.all_reduce(t)
    return bool(t.item() > 0)


def sum_and_flag_failures(sums: torch.Tensor, failed: bool) -> tuple[torch.Tensor, list[int]]:
    """``sums`` (float64) summed over the ranks, and the ranks where ``failed`` was true, in
    one all-reduce: a failure flag per rank travels next to the maps, so that every rank
    learns of any rank's failure without a second collective."""
    rank, world = rank_and_world()
    flags = torch.zeros(world, dtype=torch.float64)
    flags[rank] = float(failed)
    buffer = torch.cat([sums.flatten().double(), flags]).to(comm_device())
    dist = process_group()
    if dist is not None and world > 1:
        dist.all_reduce(buffer)
    buffer = buffer.cpu()
    n = sums.numel()
    return buffer[:n].reshape(sums.shape), [r for r in range(world) if buffer[n + r] > 0]


def comm_device() -> torch.device:
    dist = process_group()
    backend = str(dist.get_backend()) if dist is not None else ""
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def gathered_parameters(model: nn.Module) -> Iterator[None]:
    """FSDP2: every ``fully_shard`` module's parameters gathered for the whole block.

    Flags are changed on the parameter groups directly (the public setters also change how
    the root is picked at FSDP's lazy initialisation) and restored afterwards; a root that
    FSDP initialised during the block gets what its initialisation decided (no reshard after
    forward), exactly as without the probe.
    """
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    states = [m._get_fsdp_state() for m in modules]
    saved = [
        (s, s._is_root, g, g.post_forward_mesh_info, g.reshard_after_backward, g.reduce_grads,
         g.all_reduce_grads)
        for s in states for g in s._fsdp_param_groups
    ]  # fmt: skip
    if any(not hasattr(m, "reset_iter_state") for m in modules):
        raise ERFProbeError(
            "Probing an FSDP2 model needs FSDPModule.reset_iter_state() (a newer torch)."
        )
    try:
        for _s, _r, g, *_ in saved:
            g.post_forward_mesh_info = None
            g.reshard_after_backward = False
            g.reduce_grads = g.all_reduce_grads = False
        for m in modules:  # the same modules in the same order on every rank
            m.unshard()
        yield
    finally:
        for s, was_root, g, mesh_info, after_backward, reduce, all_reduce in saved:
            newly_root = was_root is None and s._is_root and s._auto_reshard_after_forward
            g.post_forward_mesh_info = None if newly_root else mesh_info
            g.reshard_after_backward = after_backward
            g.reduce_grads, g.all_reduce_grads = reduce, all_reduce
        for m in modules:
            with contextlib.suppress(RuntimeError):  # only roots may reset; others raise
                m.reset_iter_state()
            m.reshard()


def refusal(kind: Sharding, option: bool | str) -> str | None:
    if kind == "fsdp2":
        return (
            "distributed_probe=False, but the parameters are sharded (FSDP2): rank 0 cannot "
            "probe alone. Use distributed_probe='auto'."
            if option is False
            else None
        )
    what = {
        "fsdp1": "FullyShardedDataParallel (FSDP1) modules",
        "dtensor": "DTensor parameters sharded over model-parallel ranks (tensor parallelism?)",
        "deepspeed": "DeepSpeed ZeRO-3 partitioned parameters",
    }[kind]
    return (
        f"the model has {what}; erf-monitor probes sharded models only when they are sharded "
        "over the data-parallel ranks with FSDP2 (torch.distributed.fsdp.fully_shard: "
        "Lightning ModelParallelStrategy, Accelerate fsdp_version=2). No probe will run"
    )


def share(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """Indices of this rank's samples (``ceil(n / world)`` on every rank) and how many are real."""
    per = math.ceil(n / world)
    start = rank * per
    real = max(0, min(n - start, per))
    return [min(start + i, n - 1) for i in range(per)], real
