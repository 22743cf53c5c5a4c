"""The framework-free engine behind :class:`~erf_monitor.ERFMonitor` and :func:`~erf_monitor.watch`.

It knows nothing about Lightning: it validates the configuration, owns the fixed probe batch,
caches layer names and TRFs, decides *when* to probe, runs the probe, logs to sinks, keeps the
history, runs the coverage-alert state machine, and turns failures into warnings. The two
integrations only decide *where* the model, the steps and the sinks come from.

The coverage alert's policy and state live in :mod:`erf_monitor.monitor.alerts`; the engine
resolves which layers are checked against which threshold (a float ``min_coverage`` checks
only the deepest watched layer, a mapping exactly the layers it names, ``None`` none), asks
the policy after every probe, and once more at the end of training (:meth:`MonitorEngine.end`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from erf_monitor.core import warn as _warn
from erf_monitor.core.devices import model_device_dtype
from erf_monitor.core.errors import (
    ERFCoverageWarning,
    ERFInputWarning,
    ERFProbeError,
    ERFProbeWarning,
)
from erf_monitor.core.modes import Mode
from erf_monitor.core.probing import probing
from erf_monitor.core.rng import preserved_rng
from erf_monitor.inputs.batch import find_image
from erf_monitor.monitor.alerts import AlertPolicy, CoverageAlerts, fmt_shape
from erf_monitor.monitor.options import (
    DEFAULT_MIN_COVERAGE,
    MinCoverage,
    MonitorOptions,
    OnInsufficient,
    ProbeInputs,
)
from erf_monitor.probe import distributed as dist_
from erf_monitor.probe.compute import probe, probe_input
from erf_monitor.probe.crop import CropOption
from erf_monitor.probe.plan import ProbePlan, build_plan, probe_dtype
from erf_monitor.sinks import Sink, metric_patterns
from erf_monitor.targets.layers import resolve_layers, spec_matches, unwrap_model
from erf_monitor.targets.tokens import TokenLayoutArg

if TYPE_CHECKING:
    from erf_monitor.measure.result import ERFResults
    from erf_monitor.trf.types import TRF

__all__ = [
    "DEFAULT_MIN_COVERAGE",
    "MinCoverage",
    "MonitorEngine",
    "OnInsufficient",
    "ProbeInputs",
    "deepest_layer",
    "preserved_rng",
]

log = logging.getLogger("erf_monitor")


_STATE_VERSION = 1
#: Metric groups every probe measures for the history (cheap: a few passes over the map's
#: field), whatever ``metrics=`` logs.
HISTORY_GROUPS: tuple[str, ...] = ("trf", "extent", "moments")


def deepest_layer(model: nn.Module, names: Sequence[str]) -> str:
    """The watched layer that runs last: the one whose subtree ends last in ``named_modules()``
    order (a container after its children); ``"stage[0]"``-style selectors count as their
    module. Ties keep the later name."""
    order = [n for n, _ in unwrap_model(model).named_modules()]

    def end(name: str) -> tuple[int, int]:
        base = name.split("[", 1)[0]
        last = max(
            (i for i, n in enumerate(order) if base in ("", n) or n.startswith(base + ".")),
            default=-1,
        )
        return last, -base.count(".")

    best = names[0]
    for name in names[1:]:
        if end(name) >= end(best):
            best = name
    return best


class _Recorder(Sink):
    """Forwards to a sink and remembers its exceptions (so that ``strict`` can re-raise them
    after :class:`MultiSink` has reported them once)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.errors: list[Exception] = []

    def __repr__(self) -> str:
        return repr(self.sink)

    def _call(self, method: str, *args: Any) -> None:
        try:
            getattr(self.sink, method)(*args)
        except Exception as exc:
            self.errors.append(exc)
            raise

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        self._call("log_scalars", scalars, step)

    def log_image(self, key: str, image: Any, step: int) -> None:
        self._call("log_image", key, image, step)

    def log_text(self, key: str, text: str, step: int) -> None:
        self._call("log_text", key, text, step)

    def log_arrays(self, key: str, arrays: Mapping[str, Any], step: int) -> None:
        self._call("log_arrays", key, arrays, step)

    def alert(self, title: str, text: str, step: int) -> None:
        self._call("alert", title, text, step)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")


@dataclass
class ProbeOutcome:
    """What one probe did: its results (``None`` if skipped) and the alerts it fired."""

    step: int
    results: ERFResults | None = None
    seconds: float = math.nan
    alerts: list[str] = field(default_factory=list)


class MonitorEngine:
    """Configuration, probe batch, schedule, history and alert state of one monitor.

    Takes a :class:`~erf_monitor.MonitorOptions` and/or its fields as keyword arguments
    (validated there); the attributes below mirror the options for the integrations.
    """

    def __init__(self, options: MonitorOptions | None = None, **overrides: Any) -> None:
        opts = MonitorOptions.build(options, overrides)
        self.options = opts
        self.layers: str | list[str] = (
            opts.layers if isinstance(opts.layers, str) else list(opts.layers)
        )
        self.every_n_steps = opts.every_n_steps
        self.num_samples = opts.num_samples
        self.patience = opts.patience
        self.chunk_size = opts.chunk_size
        cov = opts.min_coverage
        self.min_coverage: float | dict[str, float] | None = (
            dict(cov) if isinstance(cov, Mapping) else cov
        )
        self.on_insufficient: OnInsufficient = opts.on_insufficient
        self.source = opts.source
        self.input_key = opts.input_key
        self.forward_fn = opts.forward_fn
        self.mode: Mode = opts.mode
        self.seed = opts.seed
        self.prefix = opts.prefix
        self.render_kwargs = dict(opts.render_kwargs)
        self.strict = opts.strict
        self.summary = opts.summary
        self.token_layout: TokenLayoutArg = opts.token_layout
        self.position = opts.position
        self.start_run()
        self.set_sinks(())

    # ------------------------------------------------------------------ runs
    def start_run(self) -> None:
        """Start afresh, as for a new model or Trainer: no history, no probe batch (unless
        ``probe_inputs`` is a tensor), no alert state, nothing cached about a model."""
        # -- state (checkpointed) ------------------------------------------------------------
        self.probe_batch: torch.Tensor | None = None
        if isinstance(self.options.probe_inputs, torch.Tensor):
            self.set_probe_batch(self.options.probe_inputs)
        self.history: dict[str, dict[int, dict[str, float]]] = {}
        self.probe_times: dict[int, float] = {}
        self.last_probe_step: int | None = None
        self._alerts = CoverageAlerts(AlertPolicy(self.patience, self.options.alert_warmup))
        #: True once :meth:`load_state_dict` restored a checkpoint's state into this run.
        self.resumed = False
        # -- caches (not checkpointed) -------------------------------------------------------
        #: The probe plan (targets, TRFs, seed units, crop groups): built at the first probe.
        self.plan: ProbePlan | None = None
        self._thresholds: dict[str, float] = {}
        self._disabled: str | None = None
        self._awaiting_batch = False  # a probe was due before a probe batch was captured
        self._reported: set[str] = set()
        self._contradicted: set[str] = set()
        self._noted: set[str] = set()
        self._mode_logged = False
        self.latest: ERFResults | None = None

    # ------------------------------------------------------------------ configuration helpers
    def check_layers(self, model: nn.Module) -> None:
        """Raise ``ValueError`` (listing the available names) for unknown explicit layers."""
        if self.layers != "auto":
            resolve_layers(model, self.layers)
        if isinstance(self.min_coverage, dict):
            table = [n for n, _ in unwrap_model(model).named_modules() if n]
            for spec in self.min_coverage:
                with contextlib.suppress(ValueError):
                    resolve_layers(model, [spec])  # also names with output selectors
                    continue
                if not any(fnmatchcase(n, spec) or spec_matches(n, spec) for n in table):
                    raise ValueError(
                        f"min_coverage names layer {spec!r}, which matches no module of the model."
                    )

    # ------------------------------------------------------------------ probe batch
    @property
    def needs_batch(self) -> bool:
        """True while the probe batch still has to come from a training batch."""
        return self.probe_batch is None and self.source in ("train", "noise")

    def set_probe_batch(self, x: torch.Tensor) -> None:
        """Store the first ``num_samples`` of ``x`` as the probe batch (detached CPU copy)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 3:
            raise ValueError(
                "The probe batch must be a floating-point tensor (N, C, *spatial), got "
                + (f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else repr(x))
            )
        # copy=True: never alias the training batch, even when it already lives on the CPU.
        with torch.inference_mode(False):  # a normal tensor even if x is an inference tensor
            self.probe_batch = x[: self.num_samples].detach().to("cpu", torch.float32, copy=True)
        if self.probe_batch.shape[0] < self.num_samples:
            log.info(
                "erf-monitor: the probe batch has %d samples (num_samples=%d).",
                self.probe_batch.shape[0],
                self.num_samples,
            )
        self.plan = None

    def capture(self, batch: Any) -> bool:
        """Take the probe batch from a training batch (or its shape, for ``"noise"``).

        Returns:
            ``False`` when the images to take hold NaN or Inf values: the batch is not taken
            (said once), so that a later batch is (no ERF of such images means anything).
        """
        x = find_image(batch, self.input_key)
        if self.source == "noise":
            gen = torch.Generator().manual_seed(self.seed)
            shape = (self.num_samples, *x.shape[1:])
            self.set_probe_batch(torch.randn(shape, generator=gen))
            return True
        self.set_probe_batch(x)
        assert self.probe_batch is not None
        if bool(torch.isfinite(self.probe_batch).all()):
            return True
        self.probe_batch = None
        message = (
            f"a training batch holds NaN or Inf values in its first {self.num_samples} images; "
            "the probe batch is taken from a later batch"
        )
        if "nonfinite" in self._reported:  # said once: not again at every batch
            log.debug("erf-monitor: %s", message)
        else:
            self.report("nonfinite", message)
        return False

    def capture_from_loader(self, loader: Any) -> None:
        """Take the probe batch from ``loader``'s first ``num_samples`` items (dataset order).

        The loader itself is never iterated (no sampler, worker or persistent-iterator state
        changes) and every random stream is restored: see
        :func:`erf_monitor.inputs.loaders.first_items`.
        """
        from erf_monitor.inputs.loaders import first_items

        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        elif isinstance(loader, Mapping):
            loader = next(iter(loader.values()), None)
        if loader is None:
            raise ValueError("probe_inputs='val' but the trainer has no validation dataloader.")
        self.set_probe_batch(find_image(first_items(loader, self.num_samples), self.input_key))
        if self.probe_batch is not None and not bool(torch.isfinite(self.probe_batch).all()):
            self.probe_batch = None
            raise ValueError(f"the first {self.num_samples} validation images hold NaN or Inf")

    # ------------------------------------------------------------------ schedule
    def should_probe(self, step: int, force: bool = False) -> bool:
        """Whether to probe at ``step``: a multiple of ``every_n_steps`` was reached (or crossed,
        when one batch advances several steps) since the last probe; ``force`` probes at any step
        not probed yet (fit start and end). Never twice at the same step, except that on a
        single process a probe skipped because no probe batch had been captured yet (a first
        batch with NaN values) is made up as soon as there is one."""
        if self._awaiting_batch and self.probe_batch is not None and dist_.rank_and_world()[1] == 1:
            return True  # a probe was skipped for want of a batch: made up now that there is one
        last = self.last_probe_step
        if last is None:
            return force or step % self.every_n_steps == 0
        if step == last:
            return False
        return force or step // self.every_n_steps > last // self.every_n_steps

    def mark(self, step: int) -> None:
        """Record that ``step`` was handled (ranks that do not probe call this too)."""
        self.last_probe_step = step

    # ------------------------------------------------------------------ preparation
    def _prepare(self, model: nn.Module, position: Any = None, crop: CropOption = "auto") -> None:
        """Build the probe plan (once per fit; again only when the probe batch changes)."""
        assert self.probe_batch is not None
        net = unwrap_model(model)
        device, dtype = model_device_dtype(net)  # (probe_dtype: float32 unless floating)
        device = torch.device("cpu") if device is None else device
        batch = self.probe_batch
        if batch.is_floating_point() and not bool(torch.isfinite(batch).all()):
            # Said of the real batch (its shape and samples), not of the 2-sample example.
            probe_input(batch, torch.device("cpu"), batch.dtype)  # raises, naming them
        example = probe_input(batch[:2], device, probe_dtype(None, dtype))
        # One probe (or plan) at a time: they save and restore model state.
        with probing(), warnings.catch_warnings():
            if self.strict:  # an input too small for a layer is a setup error then
                warnings.simplefilter("error", ERFInputWarning)
            plan = build_plan(
                model, example, self.layers, mode=self.mode,
                position=self.position if position is None else position,
                token_layout=self.token_layout, forward_fn=self.forward_fn, crop=crop,
                raise_trf_errors=False,
            )  # fmt: skip
        self.plan = plan
        self._thresholds = self._resolve_thresholds(net, plan.names)
        if plan.trf_error is not None:
            self.report(
                "trf",
                f"the theoretical receptive field could not be analysed ({plan.trf_error}); "
                "ERF/TRF ratios will be NaN",
            )

    def _timed_probe(
        self, model: nn.Module, batch: torch.Tensor, keep_per_sample: bool = False
    ) -> tuple[ERFResults, float]:
        """Probe ``batch`` with the plan; the results and the wall time (CUDA synchronised)."""
        assert self.plan is not None
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t0 = time.perf_counter()
        device, _ = model_device_dtype(unwrap_model(model))
        device = torch.device("cpu") if device is None else device
        with probing(), preserved_rng(device):  # (probing first: one probe at a time)
            x = probe_input(batch, device, self.plan.dtype)
            results = probe(self.plan, model, x, chunk_size=self.chunk_size,
                            keep_per_sample=keep_per_sample)  # fmt: skip
        sync()
        return results, time.perf_counter() - t0

    @property
    def layer_names(self) -> list[str] | None:
        """The probed layers, resolved (``None`` before the plan is built)."""
        return None if self.plan is None else self.plan.names

    @property
    def trfs(self) -> dict[str, TRF | None] | None:
        """Every layer's TRF at its primary seed unit (``None`` before the plan is built)."""
        return None if self.plan is None else self.plan.primary_trfs()

    def _resolve_thresholds(self, net: nn.Module, names: list[str]) -> dict[str, float]:
        cov = self.min_coverage
        if cov is None or not names:
            return {}
        if isinstance(cov, float):
            return {deepest_layer(net, names): cov}
        out: dict[str, float] = {}
        for name in names:
            for spec, value in cov.items():
                if spec_matches(name, spec) or fnmatchcase(name, spec):
                    out[name] = value
                    break
        return out

    def _note_small_trf(self) -> None:
        """Log (information, once per layer) when a checked layer's TRF cannot cover the input."""
        assert self.probe_batch is not None and self.trfs is not None
        spatial = tuple(self.probe_batch.shape[2:])
        area = math.prod(spatial)
        for name, threshold in self._thresholds.items():
            trf = self.trfs.get(name)
            if name in self._noted or trf is None or trf.is_global:
                continue
            clipped = trf.clipped_size
            if all(c >= s for c, s in zip(clipped, spatial)):
                continue
            self._noted.add(name)
            best = math.prod(clipped) / area
            log.info(
                "erf-monitor: the theoretical receptive field of layer %r (%s px) is smaller "
                "than the %s input: its ERF can cover at most %.1f%% of it "
                "(min_coverage %.1f%%%s).",
                name,
                trf.clipped_text("x"),
                fmt_shape(spatial),
                100 * best,
                100 * threshold,
                ": unreachable, only an architecture change helps" if best < threshold else "",
            )

    # ------------------------------------------------------------------ sinks
    def set_sinks(self, sinks: Sequence[Sink]) -> None:
        """Where probes are logged from now on (a failing sink is reported once, never raises,
        unless ``strict``)."""
        from erf_monitor.sinks import MultiSink

        self._recorders = [_Recorder(s) for s in sinks]
        self.sinks = MultiSink(self._recorders)
        self._mode_logged = False  # the mode's definition goes to new sinks with the next probe

    def _raise_sink_errors(self) -> None:
        for rec in self._recorders:
            if rec.errors:
                exc = rec.errors[0]
                rec.errors.clear()
                if self.strict:
                    raise exc

    def flush(self) -> None:
        """Flush every sink."""
        self.sinks.flush()
        self._raise_sink_errors()

    def close(self) -> None:
        """Flush and close every sink (sinks never close a user's writer or run)."""
        self.sinks.flush()
        self.sinks.close()
        self._raise_sink_errors()

    # ------------------------------------------------------------------ probing
    def probe(self, model: nn.Module, step: int) -> ProbeOutcome:
        """Probe ``model`` at ``step``, log to the sinks, update history and alerts.

        Failures are reported as :class:`ERFProbeWarning` (re-raised when ``strict``); the
        probe is then skipped. Alerts that fired are returned; acting on them (raise / stop)
        is left to the caller so that distributed runs can agree first.
        """
        self.last_probe_step = step
        if self.all_ranks_probe(model):  # every rank takes part: see _distributed
            return self._probe_on_all_ranks(model, step)
        outcome = ProbeOutcome(step)
        if self._disabled is not None:
            return outcome
        self._awaiting_batch = self.probe_batch is None
        if self.probe_batch is None:
            log.debug("erf-monitor: no probe batch yet at step %d; probe skipped", step)
            return outcome
        if self.plan is None or not self.plan.built_for(model):
            try:
                self._prepare(model)
            except Exception as exc:
                self._disabled = f"{type(exc).__name__}: {exc}"
                self.report("setup", f"the monitor could not be set up ({exc}); it is off", exc)
                return outcome
            self._note_small_trf()
        caught: list[warnings.WarningMessage] = []
        try:
            # The probe's own warnings (an all-zero map...) are re-issued at the user's line.
            with warnings.catch_warnings(record=True) as caught:
                for name in self._contradicted:  # the probe warned once already
                    warnings.filterwarnings(
                        "ignore", re.escape(f"Layer {name!r}: ") + ".*outside the clipped TRF"
                    )
                results, seconds = self._timed_probe(model, self.probe_batch)
        except Exception as exc:
            _warn.reissue(caught)
            self.report("probe", f"the ERF probe at step {step} failed and was skipped: {exc}", exc)
            return outcome
        _warn.reissue(caught)
        self._publish(outcome, results, seconds)
        return outcome

    def _report_all_ranks(self, kind: str, message: str, exc: BaseException) -> None:
        """Rank 0 warns (once per kind); the other ranks only log, unless ``strict`` (all raise)."""
        if dist_.rank_and_world()[0] == 0 or self.strict:
            self.report(kind, message, exc)
        else:
            log.info("erf-monitor: %s", message)

    def _single_position(self) -> Any:
        """The unit the distributed probe seeds: ``position`` when it names one unit; for a set
        (``"corners"``, a grid...) the centre, said once: only one map per layer is all-reduced."""
        from erf_monitor.targets.positions import request

        req = request(self.position)
        if req.is_set:
            if "position" not in self._reported:
                self._reported.add("position")
                log.warning(
                    "erf-monitor: the distributed probe measures one unit per layer; "
                    "position=%r is a set, so only its centre unit is probed (probe on one "
                    "rank for the field).",
                    self.position,
                )
            return "centre"
        return self.position

    def _probe_on_all_ranks(self, model: nn.Module, step: int) -> ProbeOutcome:
        """:meth:`probe` when every rank takes part (:mod:`erf_monitor.probe.distributed`)."""
        from erf_monitor.measure.metrics import finalise_map
        from erf_monitor.measure.result import ERFResults

        outcome = ProbeOutcome(step)
        if self._disabled is not None:  # decided on every rank alike
            return outcome
        rank, world = dist_.rank_and_world()
        kind = dist_.sharding(model)
        refusal = None if kind is None else dist_.refusal(kind, self.options.distributed_probe)
        if refusal is not None:
            self._disabled = refusal
            self._report_all_ranks("setup", refusal, ERFProbeError(refusal))
            return outcome
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t0 = time.perf_counter()
        batch = dist_.broadcast_object(self.probe_batch if rank == 0 else None)
        if batch is None:
            return outcome
        if self.probe_batch is None or not torch.equal(self.probe_batch, batch):
            self.set_probe_batch(batch)  # also resets layers/TRFs: prepared again below
        gathered = dist_.gathered_parameters(model) if kind == "fsdp2" else contextlib.nullcontext()
        with gathered:
            stale = self.plan is None or not self.plan.built_for(model)
            if dist_.any_rank(stale):  # every rank builds the plan again, together
                setup = ""
                try:
                    with warnings.catch_warnings():
                        if rank != 0:  # the same analysis everywhere: rank 0 tells about it
                            warnings.simplefilter("ignore")
                        # One unit per layer (one map all-reduced); sharded: never cropped.
                        crop: CropOption = "auto" if kind is None else False
                        self._prepare(model, self._single_position(), crop)
                except Exception as exc:
                    self.plan = None
                    if rank == 0:  # (another rank's failure fails its probes, below)
                        setup = f"{type(exc).__name__}: {exc}"
                # Rank 0's layers size the all-reduced maps on every rank.
                error = dist_.broadcast_object(setup if rank == 0 and self.plan is None else None)
                if error is not None:
                    self._disabled = error
                    msg = f"the monitor could not be set up ({error}); it is off"
                    self._report_all_ranks("setup", msg, ERFProbeError(msg))
                    return outcome
                if rank == 0:
                    self._note_small_trf()
            names = list(dist_.broadcast_object(self.layer_names if rank == 0 else None) or [])
            n, spatial = batch.shape[0], tuple(batch.shape[2:])
            indices, real = dist_.share(n, rank, world)
            sums = torch.zeros((len(names), *spatial), dtype=torch.float64)
            local = None
            failure: Exception | None = None
            caught: list[warnings.WarningMessage] = []
            try:
                if self.plan is None:
                    raise ERFProbeError("the probe plan could not be built on this rank")
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    local, _ = self._timed_probe(model, batch[indices], keep_per_sample=True)
                for i, name in enumerate(names):
                    per_sample = local[name].per_sample
                    assert per_sample is not None
                    sums[i] = per_sample[:real].double().sum(0)
            except Exception as exc:
                failure = exc
            flags = torch.zeros(world, dtype=torch.float64)
            flags[rank] = float(failure is not None)
            buffer = torch.cat([sums.flatten(), flags]).to(dist_.comm_device())
            dist = dist_.process_group()
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
            self._report_all_ranks("probe", msg, failure or ERFProbeError(msg))
            return outcome
        assert local is not None
        total = buffer[: sums.numel()].reshape(sums.shape)
        results = ERFResults(
            {
                name: local[name].with_heatmap(finalise_map(total[i], n, self.mode), n)
                for i, name in enumerate(names)
            }
        )
        sync()
        seconds = time.perf_counter() - t0
        if rank == 0:
            self._publish(outcome, results, seconds)
        else:
            outcome.results, outcome.seconds = results, seconds
            self.latest = results
        return outcome

    def all_ranks_probe(self, model: nn.Module) -> bool:
        """Whether every rank must call :meth:`probe` (not only global rank 0).

        True when the parameters are sharded (FSDP2) or ``distributed_probe=True`` in a
        process group of several ranks: then the ranks probe their shares together.
        """
        return dist_.all_ranks_probe(model, self.options.distributed_probe)

    def _publish(self, outcome: ProbeOutcome, results: ERFResults, seconds: float) -> None:
        """Record a successful probe: history, sinks, alerts (on the process that logs)."""
        assert self.plan is not None  # set by _prepare before any probe
        step = outcome.step
        outcome.results, outcome.seconds = results, seconds
        self.latest = results
        for name, r in results.items():
            others = r.field.values() if r.field is not None else ()
            issue = r.trf_issue is not None or any(x.trf_issue is not None for x in others)
            if issue and name not in self._contradicted:
                # The map contradicts the TRF: it is reported unknown from now on (the probe
                # rejects it again each time, silently). Its geometry still gives the seed
                # unit's centre, so metrics stay comparable; no more cropping to it.
                self._contradicted.add(name)
                self.plan.distrust(name)
        # Measured once, for the history and the sinks: what is logged, and the cheap
        # numbers the summary and reports read (TRF, extents, moments); the Gaussian fit and
        # the shape diagnostics only when asked for (MonitorOptions.metrics).
        asked = metric_patterns(self.options.metrics)
        measured = results.scalars(None if asked is None else [*HISTORY_GROUPS, *asked])
        for name, values in measured.items():
            self.history.setdefault(name, {})[step] = dict(values)
        self.probe_times[step] = float(seconds)
        extra = {f"{self.prefix}/probe_time_s": float(seconds)}
        # The thresholds too, so that reports draw them for every run, alert or not.
        for name, threshold in self._thresholds.items():
            extra[f"{self.prefix}/{name}/min_coverage"] = threshold
        try:
            from erf_monitor.sinks import log_results

            # One log_scalars call and one flush per probe (after the alerts): a callable
            # sink is called once, W&B gets one history row.
            log_results(
                self.sinks, results, step, prefix=self.prefix, render_kwargs=self.render_kwargs,
                mode_text=not self._mode_logged, metrics=self.options.metrics, extra=extra,
                flush=False, values=measured,
            )  # fmt: skip
            self._mode_logged = True
        except Exception as exc:
            self.report("log", f"logging the ERF probe at step {step} failed: {exc}", exc)
        outcome.alerts = self._check_alerts(results, step)
        self.sinks.flush()
        self._raise_sink_errors()

    def _check_alerts(self, results: ERFResults, step: int, final: bool = False) -> list[str]:
        return self._alerts.check(
            results, step, self.history, self._thresholds, self.sinks, final=final
        )

    @property
    def alerted(self) -> dict[str, int]:
        """``{layer: step}`` of the alerts fired (checkpointed)."""
        return self._alerts.alerted

    def end(self) -> list[str]:
        """The alert policy's final decision, after the final probe (at the end of training,
        on the process that logs): alert every checked layer still below its threshold at
        its latest probe. A warning and an alert in every sink; nothing to stop any more."""
        latest = self.latest
        if latest is None or not self.history:
            return []
        step = max(max(h) for h in self.history.values() if h)
        try:
            fired = self._check_alerts(latest, step, final=True)
        except Exception as exc:
            self.report("alert", f"the end-of-training alert check failed: {exc}", exc)
            return []
        if fired:
            self.sinks.flush()
            self._raise_sink_errors()
        return fired

    def print_summary(self) -> None:
        """Print the end-of-training table (see ``MonitorOptions.summary``); never raises
        unless ``strict``."""
        if not self.summary:
            return
        try:
            from erf_monitor.monitor.summary import print_summary

            print_summary(self.history, self.alerted, self._thresholds)
        except Exception as exc:
            self.report("summary", f"the end-of-training summary could not be printed: {exc}", exc)

    def report(self, kind: str, message: str, exc: BaseException | None = None) -> None:
        """Report a monitor failure: re-raise when ``strict``, else warn once per kind (a
        warning that the warnings filter would raise is logged instead, see
        :mod:`erf_monitor.core.warn`)."""
        if self.strict and exc is not None:
            raise exc
        if kind in self._reported:
            log.warning("erf-monitor: %s", message)
            return
        self._reported.add(kind)
        _warn.warn(
            f"erf-monitor: {message}.\nTraining continues; repeats go to the 'erf_monitor' "
            "logger (strict=True raises instead).",
            ERFProbeWarning,
            failure=True,  # never raised, whatever the warnings filter: training goes on
        )

    def probe_and_act(
        self,
        model: nn.Module,
        step: int,
        *,
        logs: bool,
        agree: Callable[[bool], bool] | None = None,
    ) -> tuple[ProbeOutcome, bool]:
        """One scheduled probe as every front-end runs it: probe on the process that logs
        (``logs``) or on every rank when they probe together; agree on rank 0's alert
        decision when acting on it (``agree``: the framework's broadcast from rank 0, ``None``
        on a single process); raise for ``on_insufficient="raise"``.

        Returns:
            The outcome, and whether training should stop (``on_insufficient="stop"``).
        """
        self.mark(step)  # ranks that do not probe keep the schedule too
        outcome = ProbeOutcome(step)
        if logs or self.all_ranks_probe(model):
            outcome = self.probe(model, step)
        fired = bool(outcome.alerts)
        if self.on_insufficient != "warn" and agree is not None:
            fired = agree(fired)  # only rank 0 checks alerts: every rank acts on its decision
        if fired and self.on_insufficient == "raise":
            raise self.insufficient_error(outcome.alerts)
        return outcome, fired and self.on_insufficient == "stop"

    def insufficient_error(self, alerts: Sequence[str]) -> ERFCoverageWarning:
        """The exception raised for ``on_insufficient="raise"``."""
        text = "\n".join(alerts) or "erf-monitor: insufficient ERF coverage (see rank 0's log)."
        return ERFCoverageWarning(text)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Tensors and Python scalars only: loadable with ``torch.load(weights_only=True)``."""
        return {
            "version": _STATE_VERSION,
            "probe_batch": self.probe_batch,
            "history": {n: {s: dict(v) for s, v in h.items()} for n, h in self.history.items()},
            "probe_times": dict(self.probe_times),
            "last_probe_step": self.last_probe_step,
            "below": dict(self._alerts.below),
            "alerted": dict(self._alerts.alerted),
        }

    def load_state_dict(
        self, state: Any, *, decode: Callable[[Any], Mapping[str, Any]] | None = None
    ) -> bool:
        """Restore what :meth:`state_dict` returned (after ``decode``, for a front-end that
        stores it in another form).

        State that cannot be read (written by a newer version of the library, or damaged) is
        reported once, as any monitor failure (``strict=True`` raises), and the monitor starts
        afresh: resuming a training run never fails because of the monitor.

        Returns:
            Whether the state was restored.
        """
        try:
            restored = _read_state(decode(state) if decode is not None else state)
        except Exception as exc:
            self.start_run()
            self.report(
                "state",
                "the monitor state saved in the checkpoint cannot be read "
                f"({type(exc).__name__}: {_first_line(exc)}); its probe batch, ERF history and "
                "alert state are lost, and the monitor starts afresh from this step",
                exc,
            )
            return False
        if restored["probe_batch"] is not None:
            self.probe_batch = restored["probe_batch"]
            self.plan = None
        self.history = restored["history"]
        self.probe_times = restored["probe_times"]
        self.last_probe_step = restored["last_probe_step"]
        self._alerts.below = restored["below"]
        self._alerts.alerted = restored["alerted"]
        self.resumed = True
        return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


def _read_state(state: Any) -> dict[str, Any]:
    """The engine attributes that ``state`` (what :meth:`MonitorEngine.state_dict` returned)
    holds, converted and checked; raises for state this version cannot read."""
    if not isinstance(state, Mapping):
        raise TypeError(f"a {type(state).__name__}, not a mapping")
    version = int(state.get("version", _STATE_VERSION))
    if version > _STATE_VERSION:
        raise ValueError(
            f"written by a newer erf-monitor: state version {version}, this one reads up to "
            f"{_STATE_VERSION}"
        )
    batch = state.get("probe_batch")
    if batch is not None:
        if not isinstance(batch, torch.Tensor) or not batch.is_floating_point() or batch.ndim < 3:
            raise TypeError("the probe batch is not a floating-point image tensor")
        batch = batch.detach().to("cpu", copy=True)
    last = state.get("last_probe_step")
    return {
        "probe_batch": batch,
        "history": {
            str(n): {int(s): {str(k): float(x) for k, x in v.items()} for s, v in h.items()}
            for n, h in state.get("history", {}).items()
        },
        "probe_times": {int(s): float(t) for s, t in state.get("probe_times", {}).items()},
        "last_probe_step": None if last is None else int(last),
        "below": {str(k): int(v) for k, v in state.get("below", {}).items()},
        "alerted": {str(k): int(v) for k, v in state.get("alerted", {}).items()},
    }


class EngineView:
    """Read-only properties shared by :class:`~erf_monitor.ERFMonitor` and ``Watcher``."""

    _engine: MonitorEngine

    @property
    def every_n_steps(self) -> int:
        """Probe period in optimizer steps."""
        return self._engine.every_n_steps

    @property
    def min_coverage(self) -> float | dict[str, float] | None:
        """Alert threshold(s)."""
        return self._engine.min_coverage

    @property
    def layers(self) -> list[str] | None:
        """Resolved layer names (``None`` until the first probe)."""
        return None if self._engine.layer_names is None else list(self._engine.layer_names)

    @property
    def probe_batch(self) -> torch.Tensor | None:
        """The fixed probe batch (CPU), once captured."""
        return self._engine.probe_batch

    @property
    def history(self) -> dict[str, dict[int, dict[str, float]]]:
        """``{layer: {step: {metric: value}}}`` of every probe so far (on rank 0)."""
        return self._engine.history

    @property
    def latest(self) -> ERFResults | None:
        """Results of the latest successful probe (on rank 0)."""
        return self._engine.latest

    @property
    def alerts(self) -> dict[str, int]:
        """Coverage alerts fired so far: ``{layer: step}``, the step of the probe at which each
        layer's alert fired (at most once per layer, kept across checkpoint/resume); empty
        while no alert fired. ``{"layer4": 0}`` means: already below ``min_coverage`` at the
        first probe, before any training step."""
        return dict(self._engine.alerted)
