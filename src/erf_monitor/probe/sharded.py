"""``compute_erf`` with the probe images sharded over the ranks of a process group.

Launched with ``torchrun --nproc_per_node N``, every rank holds the same probe batch, probes
its share of it (:func:`~erf_monitor.probe.distributed.share`: ``ceil(n / N)`` images per
rank, the last share padded with copies whose maps are dropped) and the per-image maps are
summed over the ranks with one all-reduce; :func:`~erf_monitor.measure.metrics.finalise_map`
turns the sum into the published map once, as a single process does. Per-sample maps (for
bootstrap intervals) are all-gathered instead.

Why the metrics equal a single process's: maps are per-sample in eval mode (a sample's map
does not depend on the others in its batch), and the sum over samples is exact up to float
rounding. Train-mode probes mix the samples of a batch and are refused.

Every rank calls :func:`compute_erf_sharded` with the same arguments and gets the same
results. A failure on any rank is reported on every rank (first a small all-reduce of
failure flags, then the maps), so no rank waits forever for the others; a TRF that the ERF
mass of any rank's images spills out of is reported unknown on every rank, as one process
would report it for the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from erf_monitor.core.errors import ERFProbeError
from erf_monitor.measure.metrics import finalise_map
from erf_monitor.measure.result import ERFField, ERFResult, ERFResults
from erf_monitor.probe.compute import compute_erf
from erf_monitor.probe.distributed import comm_device, process_group, rank_and_world, share

__all__ = ["compute_erf_sharded"]


def compute_erf_sharded(
    model: nn.Module,
    inputs: torch.Tensor,
    layers: Any = "auto",
    *,
    keep_per_sample: bool = False,
    **kwargs: Any,
) -> ERFResults:
    """:func:`~erf_monitor.compute_erf` over every rank of the default process group.

    Args:
        model: the model, the same on every rank (not wrapped in DDP: the probe runs no
            collective inside the model).
        inputs: the whole probe batch ``(N, C, *S)``, the same on every rank.
        layers: as for :func:`~erf_monitor.compute_erf`.
        keep_per_sample: also return the per-sample maps of all ``N`` images (gathered
            from every rank).
        **kwargs: other :func:`~erf_monitor.compute_erf` arguments (``mode``,
            ``chunk_size``, ``position``, ``trf``, ``forward_fn``...).

    Returns:
        The results of the whole batch, on every rank. Without a process group (or with
        one rank), exactly :func:`~erf_monitor.compute_erf`'s.

    Raises:
        ValueError: ``train_mode=True`` or ``num_samples`` with several ranks.
        ERFProbeError: the probe failed on another rank (the failing rank raises its own
            error when every rank failed).
    """
    rank, world = rank_and_world()
    if world == 1:
        return compute_erf(model, inputs, layers, keep_per_sample=keep_per_sample, **kwargs)
    if kwargs.get("train_mode"):
        raise ValueError("a train-mode probe mixes the samples of a batch; it cannot be sharded")
    if kwargs.get("num_samples") is not None:
        raise ValueError("slice the probe batch instead of num_samples= when sharding it")
    dist = process_group()
    device = comm_device()
    n = int(inputs.shape[0])
    indices, real = share(n, rank, world)
    local: ERFResults | None = None
    failure: BaseException | None = None
    try:
        local = compute_erf(model, inputs[indices], layers, keep_per_sample=True, **kwargs)
    except Exception as exc:  # told to every rank below, then raised
        failure = exc
    flags = torch.zeros(world, dtype=torch.float64, device=device)
    flags[rank] = float(failure is not None)
    dist.all_reduce(flags)
    failed = [r for r in range(world) if flags[r] > 0]
    if failed:
        if failure is not None and len(failed) == world:
            raise failure  # every rank failed alike (a bad layer name...): the plain error
        what = f": {type(failure).__name__}: {failure}" if failure is not None else ""
        raise ERFProbeError(f"the ERF probe failed on rank(s) {failed}{what}")
    assert local is not None
    flat = local.flat()
    mode = next(iter(flat.values())).mode
    # A TRF that any rank's images contradict is wrong for the whole batch (maps are >= 0)
    spilled = torch.tensor([r.trf_issue is not None for r in flat.values()], dtype=torch.float64)
    spilled = spilled.to(device)
    dist.all_reduce(spilled)
    per_sample = [_per_sample(r)[:real] for r in flat.values()]
    gathered: list[torch.Tensor | None]
    if keep_per_sample:
        gathered = list(_gather(per_sample, n, world, device))
        totals = [g.double().sum(0) for g in gathered if g is not None]
    else:
        stacked = torch.stack([p.double().sum(0) for p in per_sample]).to(device)
        dist.all_reduce(stacked)  # the sum over every rank's images
        totals = list(stacked.cpu())
        gathered = [None] * len(totals)
    full = {
        path: _rebuilt(r, finalise_map(t, n, mode), n, g, bool(s > 0))
        for (path, r), t, g, s in zip(flat.items(), totals, gathered, spilled.cpu())
    }
    return ERFResults({name: _regrouped(r, name, full) for name, r in local.items()})


def _per_sample(r: ERFResult) -> torch.Tensor:
    if r.per_sample is None:  # pragma: no cover - compute_erf was asked to keep them
        raise ERFProbeError(f"layer {r.name!r}: no per-sample maps to share")
    return r.per_sample


def _gather(
    maps: list[torch.Tensor], n: int, world: int, device: torch.device
) -> list[torch.Tensor]:
    """Every rank's real per-sample maps, in image order (shares are contiguous)."""
    dist = process_group()
    per = -(-n // world)
    local = torch.zeros((len(maps), per, *maps[0].shape[1:]), dtype=torch.float64)
    for k, m in enumerate(maps):
        local[k, : m.shape[0]] = m.double()
    parts = [torch.empty_like(local, device=device) for _ in range(world)]
    dist.all_gather(parts, local.to(device))
    out = []
    for k in range(len(maps)):
        chunks = [parts[r][k, : share(n, r, world)[1]].cpu() for r in range(world)]
        out.append(torch.cat(chunks).float())
    return out


def _rebuilt(
    r: ERFResult, heat: torch.Tensor, n: int, per_sample: torch.Tensor | None, spilled: bool
) -> ERFResult:
    whole = r.with_heatmap(heat, n)
    whole.per_sample = per_sample
    if spilled:  # the same on every rank, whichever ranks' images showed it
        whole.trf = None
        whole.trf_issue = (
            "some of the ERF mass lies outside the clipped TRF: the TRF analysis is wrong for "
            "this layer, so its TRF is reported unknown"
        )
    return whole


def _regrouped(r: ERFResult, name: str, full: dict[str, ERFResult]) -> ERFResult:
    """The layer's result of the whole batch, with its field regrouped as the probe made it."""
    if r.field is None:
        return full[name]
    by_key = {key: full[name if key == "centre" else f"{name}/{key}"] for key in r.field}
    primary = by_key[r.position]
    primary.field = ERFField(by_key, grid=r.field.grid)
    return primary
