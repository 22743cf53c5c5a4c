"""The monitor's probe when every rank takes part (sharded FSDP2 parameters, or
``distributed_probe=True``): see :mod:`erf_monitor.probe.distributed` for how every rank is
kept running the same collectives.

Every rank probes its share of rank 0's probe batch with the plan they built together; one
all-reduce sums the maps and carries a failure flag per rank. Rank 0 publishes (history,
sinks, alerts); the other ranks get the same results.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from erf_monitor.core import warn as _warn
from erf_monitor.core.errors import ERFProbeError
from erf_monitor.monitor.options import MonitorOptions
from erf_monitor.monitor.outcome import ProbeOutcome
from erf_monitor.probe import distributed as dist_
from erf_monitor.probe.crop import CropOption
from erf_monitor.probe.plan import ProbePlan

if TYPE_CHECKING:
    from erf_monitor.measure.result import ERFResults

__all__ = ["AllRanksProbe", "Engine"]

log = logging.getLogger("erf_monitor")


class Engine(Protocol):
    """What the all-ranks probe uses of :class:`~erf_monitor.monitor.engine.MonitorEngine`
    (its own helper: the engine's private steps included)."""

    options: MonitorOptions
    probe_batch: torch.Tensor | None
    plan: ProbePlan | None
    latest: ERFResults | None
    _disabled: str | None
    _reported: set[str]

    @property
    def layer_names(self) -> list[str] | None: ...

    def report(self, kind: str, message: str, exc: BaseException | None = None) -> None: ...

    def set_probe_batch(self, x: torch.Tensor) -> None: ...

    def _prepare(
        self, model: nn.Module, position: Any = None, crop: CropOption = "auto"
    ) -> None: ...

    def _note_small_trf(self) -> None: ...

    def _timed_probe(
        self, model: nn.Module, batch: torch.Tensor, keep_per_sample: bool = False
    ) -> tuple[ERFResults, float]: ...

    def _publish(self, outcome: ProbeOutcome, results: ERFResults, seconds: float) -> None: ...


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class AllRanksProbe:
    """One probe of ``engine`` on every rank together (called on every rank alike)."""

    def __init__(self, engine: Engine, model: nn.Module) -> None:
        self.engine = engine
        self.model = model
        self.rank, self.world = dist_.rank_and_world()
        self.kind = dist_.sharding(model)

    def report(self, kind: str, message: str, exc: BaseException) -> None:
        """Rank 0 warns (once per kind); the other ranks only log, unless ``strict`` (all raise)."""
        if self.rank == 0 or self.engine.options.strict:
            self.engine.report(kind, message, exc)
        else:
            log.info("erf-monitor: %s", message)

    def run(self, outcome: ProbeOutcome) -> ProbeOutcome:
        """Probe at ``outcome.step``; fills ``outcome`` on success (rank 0 also publishes)."""
        engine = self.engine
        if engine._disabled is not None or self._refused():  # decided on every rank alike
            return outcome
        _sync()
        t0 = time.perf_counter()
        batch = dist_.broadcast_object(engine.probe_batch if self.rank == 0 else None)
        if batch is None:
            return outcome
        if engine.probe_batch is None or not torch.equal(engine.probe_batch, batch):
            engine.set_probe_batch(batch)  # also resets layers/TRFs: prepared again below
        gathered = (
            dist_.gathered_parameters(self.model)
            if self.kind == "fsdp2"
            else contextlib.nullcontext()
        )
        with gathered:
            if not self._plan_together():
                return outcome
            # Rank 0's layers size the all-reduced maps on every rank.
            mine = engine.layer_names if self.rank == 0 else None
            names = list(dist_.broadcast_object(mine) or [])
            results = self._measure(outcome.step, batch, names)
        if results is None:
            return outcome
        _sync()
        seconds = time.perf_counter() - t0
        if self.rank == 0:
            engine._publish(outcome, results, seconds)
        else:
            outcome.results, outcome.seconds = results, seconds
            engine.latest = results
        return outcome

    def _refused(self) -> bool:
        """Whether the model's sharding is one this probe refuses (reported, monitor off)."""
        if self.kind is None:
            return False
        refusal = dist_.refusal(self.kind, self.engine.options.distributed_probe)
        if refusal is None:
            return False
        self.engine._disabled = refusal
        self.report("setup", refusal, ERFProbeError(refusal))
        return True

    def _plan_together(self) -> bool:
        """Build the probe plan on every rank when any rank needs it; ``False`` (monitor off)
        when rank 0's failed. Another rank's failure fails its probes instead (see
        :meth:`_measure`)."""
        engine, rank = self.engine, self.rank
        stale = engine.plan is None or not engine.plan.built_for(self.model)
        if not dist_.any_rank(stale):
            return True
        setup = ""
        try:
            with warnings.catch_warnings():
                if rank != 0:  # the same analysis everywhere: rank 0 tells about it
                    warnings.simplefilter("ignore")
                # One unit per layer (one map all-reduced); sharded: never cropped.
                crop: CropOption = "auto" if self.kind is None else False
                engine._prepare(self.model, self._single_position(), crop)
        except Exception as exc:
            engine.plan = None
            if rank == 0:
                setup = f"{type(exc).__name__}: {exc}"
        error = dist_.broadcast_object(setup if rank == 0 and engine.plan is None else None)
        if error is not None:
            engine._disabled = error
            msg = f"the monitor could not be set up ({error}); it is off"
            self.report("setup", msg, ERFProbeError(msg))
            return False
        if rank == 0:
            engine._note_small_trf()
        return True

    def _measure(self, step: int, batch: torch.Tensor, names: list[str]) -> ERFResults | None:
        """Probe this rank's share and sum the maps over the ranks (the probe's one
        collective); ``None`` (reported) when any rank failed."""
        from erf_monitor.measure.metrics import finalise_map
        from erf_monitor.measure.result import ERFResults

        engine, rank, world = self.engine, self.rank, self.world
        n, spatial = batch.shape[0], tuple(batch.shape[2:])
        indices, real = dist_.share(n, rank, world)
        sums = torch.zeros((len(names), *spatial), dtype=torch.float64)
        local = None
        failure: Exception | None = None
        caught: list[warnings.WarningMessage] = []
        try:
            if engine.plan is None:
                raise ERFProbeError("the probe plan could not be built on this rank")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                local, _ = engine._timed_probe(self.model, batch[indices], keep_per_sample=True)
            for i, name in enumerate(names):
                per_sample = local[name].per_sample
                assert per_sample is not None
                sums[i] = per_sample[:real].double().sum(0)
        except Exception as exc:
            failure = exc
        total, failed = dist_.sum_and_flag_failures(sums, failure is not None)
        if rank == 0 and failure is None:
            _warn.reissue(caught)  # the probe's own warnings, at the user's line
        if failed:
            msg = f"the ERF probe at step {step} failed on rank(s) {failed} and was skipped"
            if failure is not None:
                msg = f"{msg}: {type(failure).__name__}: {str(failure).rstrip('.')}"
            self.report("probe", msg, failure or ERFProbeError(msg))
            return None
        assert local is not None
        mode = engine.options.mode
        return ERFResults(
            {
                name: local[name].with_heatmap(finalise_map(total[i], n, mode), n)
                for i, name in enumerate(names)
            }
        )

    def _single_position(self) -> Any:
        """The unit the distributed probe seeds: ``position`` when it names one unit; for a set
        (``"corners"``, a grid...) the centre, said once: only one map per layer is all-reduced."""
        from erf_monitor.targets.positions import request

        engine = self.engine
        position = engine.options.position
        if request(position).is_set:
            if "position" not in engine._reported:
                engine._reported.add("position")
                log.warning(
                    "erf-monitor: the distributed probe measures one unit per layer; "
                    "position=%r is a set, so only its centre unit is probed (probe on one "
                    "rank for the field).",
                    position,
                )
            return "centre"
        return position
