"""The probe that every rank runs together: its share of the probe batch, one all-reduce.

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

Maps are summed raw (:func:`~erf_monitor._probe.finalise_map` turns the sum over all samples
into the published map, once); rank 0 logs, the other ranks get the same results.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from erf_monitor import _warn
from erf_monitor._errors import ERFProbeError

if TYPE_CHECKING:
    from erf_monitor._monitor import MonitorEngine, ProbeOutcome

__all__ = [
    "agree",
    "all_ranks_probe",
    "broadcast_object",
    "probe_on_all_ranks",
    "rank_and_world",
    "sharding",
]

Sharding = Literal["fsdp2", "fsdp1", "dtensor", "deepspeed"]

log = logging.getLogger("erf_monitor")


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    dist = _dist()
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
    if _dist() is None:
        return False
    if sharding(model) is not None:
        return True
    return option is True and rank_and_world()[1] > 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a process group)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (for decisions only rank 0 can take, e.g. alerts)."""
    return bool(broadcast_object(bool(flag)))


def _comm_device() -> torch.device:
    dist = _dist()
    backend = str(dist.get_backend()) if dist is not None else ""
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def _gathered(model: nn.Module) -> Iterator[None]:
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


def _refusal(kind: Sharding, option: bool | str) -> str | None:
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


def _report(engine: MonitorEngine, kind: str, message: str, exc: BaseException) -> None:
    """Rank 0 warns (once per kind); the other ranks only log, unless ``strict`` (all raise)."""
    if rank_and_world()[0] == 0 or engine.strict:
        engine.report(kind, message, exc)
    else:
        log.info("erf-monitor: %s", message)


def _single_position(engine: MonitorEngine) -> Any:
    """The unit the distributed probe seeds: ``position`` when it names one unit; for a set
    (``"corners"``, a grid...) the centre, said once: only one map per layer is all-reduced."""
    from erf_monitor._positions import request

    req = request(engine.position)
    if req.is_set:
        if "position" not in engine._reported:
            engine._reported.add("position")
            log.warning(
                "erf-monitor: the distributed probe measures one unit per layer; position=%r is "
                "a set, so only its centre unit is probed (probe on one rank for the field).",
                engine.position,
            )
        return "centre"
    return engine.position


def _share(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """Indices of this rank's samples (``ceil(n / world)`` on every rank) and how many are real."""
    per = math.ceil(n / world)
    start = rank * per
    real = max(0, min(n - start, per))
    return [min(start + i, n - 1) for i in range(per)], real


def probe_on_all_ranks(engine: MonitorEngine, model: nn.Module, step: int) -> ProbeOutcome:
    """:meth:`MonitorEngine.probe` when every rank takes part (see the module docstring)."""
    from erf_monitor._monitor import ProbeOutcome
    from erf_monitor._probe import compute_erf, finalise_map
    from erf_monitor._result import ERFResults

    outcome = ProbeOutcome(step)
    if engine._disabled is not None:  # decided on every rank alike
        return outcome
    rank, world = rank_and_world()
    kind = sharding(model)
    refusal = None if kind is None else _refusal(kind, engine.options.distributed_probe)
    if refusal is not None:
        engine._disabled = refusal
        _report(engine, "setup", refusal, ERFProbeError(refusal))
        return outcome
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    batch = broadcast_object(engine.probe_batch if rank == 0 else None)
    if batch is None:
        return outcome
    if engine.probe_batch is None or not torch.equal(engine.probe_batch, batch):
        engine.set_probe_batch(batch)  # also resets layers/TRFs: prepared again below
    gathered = _gathered(model) if kind == "fsdp2" else contextlib.nullcontext()
    with gathered:
        prepared = engine.layer_names is not None and engine.trfs is not None
        ready = broadcast_object((engine.layer_names, engine.trfs) if prepared else None)
        if ready is None:  # rank 0 has not analysed the model yet: every rank does
            error = None
            try:
                with warnings.catch_warnings():
                    if rank != 0:  # the same analysis everywhere: rank 0 tells about it
                        warnings.simplefilter("ignore")
                    engine._prepare(model)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            names, trfs, error = broadcast_object((engine.layer_names, engine.trfs, error))
            engine.layer_names, engine.trfs = names, trfs
            if error is not None:
                engine._disabled = error
                msg = f"the monitor could not be set up ({error}); it is off"
                _report(engine, "setup", msg, ERFProbeError(msg))
                return outcome
            if rank == 0:
                engine._note_small_trf()
        else:
            engine.layer_names, engine.trfs = ready
        names = list(engine.layer_names or [])
        n, spatial = batch.shape[0], tuple(batch.shape[2:])
        indices, real = _share(n, rank, world)
        sums = torch.zeros((len(names), *spatial), dtype=torch.float64)
        local = None
        failure: Exception | None = None
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                local = compute_erf(
                    model,
                    batch[indices],
                    names,
                    mode=engine.mode,
                    chunk_size=engine.chunk_size,
                    forward_fn=engine.forward_fn,
                    trf=engine.trfs or {},
                    token_layout=engine._layouts,
                    keep_per_sample=True,
                    crop="auto" if kind is None else False,
                    position=_single_position(engine),
                )
            for i, name in enumerate(names):
                per_sample = local[name].per_sample
                assert per_sample is not None
                sums[i] = per_sample[:real].double().sum(0)
        except Exception as exc:
            failure = exc
        flags = torch.zeros(world, dtype=torch.float64)
        flags[rank] = float(failure is not None)
        buffer = torch.cat([sums.flatten(), flags]).to(_comm_device())
        dist = _dist()
        if dist is not None and world > 1:
            dist.all_reduce(buffer)  # the one collective of the probe itself
        buffer = buffer.cpu()
    if rank == 0 and failure is None:
        _warn.reissue(caught)  # the probe's own warnings, at the user's line
    failed = [r for r in range(world) if buffer[sums.numel() + r] > 0]
    if failed:
        msg = f"the ERF probe at step {step} failed on rank(s) {failed} and was skipped"
        if failure is not None:
            msg = f"{msg}: {type(failure).__name__}: {str(failure).rstrip('.')}"
        _report(engine, "probe", msg, failure or ERFProbeError(msg))
        return outcome
    assert local is not None
    total = buffer[: sums.numel()].reshape(sums.shape)
    results = ERFResults(
        {
            name: local[name].with_heatmap(finalise_map(total[i], n, engine.mode), n)
            for i, name in enumerate(names)
        }
    )
    sync()
    seconds = time.perf_counter() - t0
    if rank == 0:
        engine._publish(outcome, results, seconds)
    else:
        outcome.results, outcome.seconds = results, seconds
        engine.latest = results
    return outcome
