"""The framework-free engine behind :class:`~erf_monitor.ERFMonitor` and :func:`~erf_monitor.watch`.

It knows nothing about Lightning: it validates the configuration, owns the fixed probe batch,
caches layer names and TRFs, decides *when* to probe, runs the probe, logs to sinks, keeps the
history, runs the coverage-alert state machine, and turns failures into warnings. The two
integrations only decide *where* the model, the steps and the sinks come from.

The coverage alert's policy and state live in :mod:`erf_monitor.monitor.alerts`, which
layers it checks against which threshold in :mod:`~erf_monitor.monitor.thresholds`; the
engine asks the policy after every probe, and once more at the end of training
(:meth:`MonitorEngine.end`). Its other parts: the probe on every rank together
(:mod:`~erf_monitor.monitor.ranks`), the sinks (:mod:`~erf_monitor.monitor.sinkset`) and the
checkpointed state (:mod:`~erf_monitor.monitor.state`).
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from erf_monitor.core import warn as _warn
from erf_monitor.core.devices import model_device_dtype
from erf_monitor.core.errors import (
    ERFCoverageWarning,
    ERFInputWarning,
    ERFProbeWarning,
)
from erf_monitor.core.probing import probing
from erf_monitor.core.rng import preserved_rng
from erf_monitor.inputs.batch import find_image
from erf_monitor.monitor.alerts import AlertPolicy, CoverageAlerts
from erf_monitor.monitor.options import (
    DEFAULT_MIN_COVERAGE,
    MinCoverage,
    MonitorOptions,
    OnInsufficient,
    ProbeInputs,
)
from erf_monitor.monitor.outcome import ProbeOutcome
from erf_monitor.monitor.ranks import AllRanksProbe
from erf_monitor.monitor.sinkset import SinkSet
from erf_monitor.monitor.state import STATE_VERSION, first_line, read_state
from erf_monitor.monitor.thresholds import (
    check_threshold_keys,
    deepest_layer,
    note_small_trfs,
    resolve_thresholds,
)
from erf_monitor.probe import distributed as dist_
from erf_monitor.probe.compute import probe, probe_input
from erf_monitor.probe.crop import CropOption
from erf_monitor.probe.plan import ProbePlan, build_plan, probe_dtype
from erf_monitor.sinks import Sink, metric_patterns
from erf_monitor.targets.layers import resolve_layers, unwrap_model

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


#: Metric groups every probe measures for the history (cheap: a few passes over the map's
#: field), whatever ``metrics=`` logs.
HISTORY_GROUPS: tuple[str, ...] = ("trf", "extent", "moments")


class MonitorEngine:
    """Configuration, probe batch, schedule, history and alert state of one monitor.

    Takes a :class:`~erf_monitor.MonitorOptions` and/or its fields as keyword arguments
    (validated there) and reads every setting from :attr:`options`; the few the front-ends
    read are read-only properties too.
    """

    def __init__(self, options: MonitorOptions | None = None, **overrides: Any) -> None:
        #: The validated options; the engine reads every setting from here.
        self.options = MonitorOptions.build(options, overrides)
        self.start_run()
        self.set_sinks(())

    # ------------------------------------------------------------------ options (read-only)
    @property
    def layers(self) -> str | list[str]:
        """``"auto"`` or the layer specs asked for (a new list)."""
        layers = self.options.layers
        return layers if isinstance(layers, str) else list(layers)

    @property
    def every_n_steps(self) -> int:
        """Probe period in optimizer steps."""
        return self.options.every_n_steps

    @property
    def min_coverage(self) -> float | dict[str, float] | None:
        """Alert threshold(s) (a copy of the mapping)."""
        cov = self.options.min_coverage
        return dict(cov) if isinstance(cov, Mapping) else cov

    @property
    def prefix(self) -> str:
        """Top-level key of everything logged."""
        return self.options.prefix

    @property
    def source(self) -> str:
        """Where the probe batch comes from (see ``MonitorOptions.source``)."""
        return self.options.source

    @property
    def forward_fn(self) -> Any:
        """How the model runs on an image batch (``None``: ``model(images)``)."""
        return self.options.forward_fn

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
        self._alerts = CoverageAlerts(AlertPolicy(self.options.patience, self.options.alert_warmup))
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
        check_threshold_keys(model, self.options.min_coverage)

    # ------------------------------------------------------------------ probe batch
    @property
    def needs_batch(self) -> bool:
        """True while the probe batch still has to come from a training batch."""
        return self.probe_batch is None and self.options.source in ("train", "noise")

    def set_probe_batch(self, x: torch.Tensor) -> None:
        """Store the first ``num_samples`` of ``x`` as the probe batch (detached CPU copy)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 3:
            raise ValueError(
                "The probe batch must be a floating-point tensor (N, C, *spatial), got "
                + (f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else repr(x))
            )
        n = self.options.num_samples
        # copy=True: never alias the training batch, even when it already lives on the CPU.
        with torch.inference_mode(False):  # a normal tensor even if x is an inference tensor
            self.probe_batch = x[:n].detach().to("cpu", torch.float32, copy=True)
        if self.probe_batch.shape[0] < n:
            log.info(
                "erf-monitor: the probe batch has %d samples (num_samples=%d).",
                self.probe_batch.shape[0],
                self.options.num_samples,
            )
        self.plan = None

    def capture(self, batch: Any) -> bool:
        """Take the probe batch from a training batch (or its shape, for ``"noise"``).

        Returns:
            ``False`` when the images to take hold NaN or Inf values: the batch is not taken
            (said once), so that a later batch is (no ERF of such images means anything).
        """
        x = find_image(batch, self.options.input_key)
        if self.options.source == "noise":
            gen = torch.Generator().manual_seed(self.options.seed)
            shape = (self.options.num_samples, *x.shape[1:])
            self.set_probe_batch(torch.randn(shape, generator=gen))
            return True
        self.set_probe_batch(x)
        assert self.probe_batch is not None
        if bool(torch.isfinite(self.probe_batch).all()):
            return True
        self.probe_batch = None
        message = (
            f"a training batch holds NaN or Inf values in its first {self.options.num_samples} "
            "images; "
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
        n = self.options.num_samples
        self.set_probe_batch(find_image(first_items(loader, n), self.options.input_key))
        if self.probe_batch is not None and not bool(torch.isfinite(self.probe_batch).all()):
            self.probe_batch = None
            raise ValueError(f"the first {n} validation images hold NaN or Inf")

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
            return force or step % self.options.every_n_steps == 0
        if step == last:
            return False
        return force or step // self.options.every_n_steps > last // self.options.every_n_steps

    def mark(self, step: int) -> None:
        """Record that ``step`` was handled (ranks that do not probe call this too)."""
        self.last_probe_step = step

    # ------------------------------------------------------------------ preparation
    def _prepare(self, model: nn.Module, position: Any = None, crop: CropOption = "auto") -> None:
        """Build the probe plan (once per fit; again only when the probe batch changes)."""
        assert self.probe_batch is not None
        opts = self.options
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
            if opts.strict:  # an input too small for a layer is a setup error then
                warnings.simplefilter("error", ERFInputWarning)
            plan = build_plan(
                model, example, self.layers, mode=opts.mode,
                position=opts.position if position is None else position,
                token_layout=opts.token_layout, forward_fn=opts.forward_fn, crop=crop,
                raise_trf_errors=False,
            )  # fmt: skip
        self.plan = plan
        self._thresholds = resolve_thresholds(net, plan.targets, opts.min_coverage)
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
            results = probe(self.plan, model, x, chunk_size=self.options.chunk_size,
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

    def _note_small_trf(self) -> None:
        """Log (information, once per layer) when a checked layer's TRF cannot cover the input."""
        assert self.probe_batch is not None and self.trfs is not None
        spatial = tuple(self.probe_batch.shape[2:])
        note_small_trfs(self._thresholds, self.trfs, spatial, self._noted)

    # ------------------------------------------------------------------ sinks
    def set_sinks(self, sinks: Sequence[Sink]) -> None:
        """Where probes are logged from now on (a failing sink is reported once, never raises,
        unless ``strict``)."""
        self.sinks = SinkSet(sinks)
        self._mode_logged = False  # the mode's definition goes to new sinks with the next probe

    def flush(self) -> None:
        """Flush every sink."""
        self.sinks.flush_checked(self.options.strict)

    def close(self) -> None:
        """Flush and close every sink (sinks never close a user's writer or run)."""
        self.sinks.close_checked(self.options.strict)

    # ------------------------------------------------------------------ probing
    def probe(self, model: nn.Module, step: int) -> ProbeOutcome:
        """Probe ``model`` at ``step``, log to the sinks, update history and alerts.

        Failures are reported as :class:`ERFProbeWarning` (re-raised when ``strict``); the
        probe is then skipped. Alerts that fired are returned; acting on them (raise / stop)
        is left to the caller so that distributed runs can agree first.
        """
        self.last_probe_step = step
        outcome = ProbeOutcome(step)
        if self.all_ranks_probe(model):  # every rank takes part
            return AllRanksProbe(self, model).run(outcome)
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
        extra = {f"{self.options.prefix}/probe_time_s": float(seconds)}
        # The thresholds too, so that reports draw them for every run, alert or not.
        for name, threshold in self._thresholds.items():
            extra[f"{self.options.prefix}/{name}/min_coverage"] = threshold
        try:
            from erf_monitor.sinks import log_results

            # One log_scalars call and one flush per probe (after the alerts): a callable
            # sink is called once, W&B gets one history row.
            log_results(
                self.sinks, results, step, prefix=self.prefix,
                render_kwargs=self.options.render_kwargs,
                mode_text=not self._mode_logged, metrics=self.options.metrics, extra=extra,
                flush=False, values=measured,
            )  # fmt: skip
            self._mode_logged = True
        except Exception as exc:
            self.report("log", f"logging the ERF probe at step {step} failed: {exc}", exc)
        outcome.alerts = self._check_alerts(results, step)
        self.sinks.flush()
        self.sinks.raise_errors(self.options.strict)

    def _check_alerts(self, results: ERFResults, step: int, final: bool = False) -> list[str]:
        return self._alerts.check(
            results, step, self.history, self._thresholds, self.sinks, final=final
        )

    @property
    def alerted(self) -> dict[str, int]:
        """``{layer: step}`` of the alerts fired (checkpointed)."""
        return self._alerts.alerted

    def end(self, *, logs: bool = True, agree: Callable[[bool], bool] | None = None) -> list[str]:
        """The alert policy's final decision, after the final probe (at the end of training):
        alert every checked layer still below its threshold at its latest probe (a warning
        and an alert in every sink, flushed, on the process that logs: ``logs``), then, for
        ``on_insufficient="raise"``, raise :meth:`insufficient_error`. Call it on every rank
        with the same ``agree`` as :meth:`probe_and_act`: only the process that logs holds
        the history, so every rank raises on its decision. ``"stop"`` has nothing left to
        stop: a warning only.

        Returns:
            The alerts that fired (none on the ranks that do not log).
        """
        fired = self._final_alerts() if logs else []
        if self.options.on_insufficient != "raise":
            return fired
        decided = bool(fired)
        if agree is not None:
            decided = agree(decided)  # the same collective on every rank, alert or not
        if decided:
            raise self.insufficient_error(fired)
        return fired

    def _final_alerts(self) -> list[str]:
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
            self.flush()  # logged before anything is raised
        return fired

    def print_summary(self) -> None:
        """Print the end-of-training table (see ``MonitorOptions.summary``); never raises
        unless ``strict``."""
        if not self.options.summary:
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
        if self.options.strict and exc is not None:
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
        if self.options.on_insufficient != "warn" and agree is not None:
            fired = agree(fired)  # only rank 0 checks alerts: every rank acts on its decision
        if fired and self.options.on_insufficient == "raise":
            raise self.insufficient_error(outcome.alerts)
        return outcome, fired and self.options.on_insufficient == "stop"

    def insufficient_error(self, alerts: Sequence[str]) -> ERFCoverageWarning:
        """The exception raised for ``on_insufficient="raise"``."""
        text = "\n".join(alerts) or "erf-monitor: insufficient ERF coverage (see rank 0's log)."
        return ERFCoverageWarning(text)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Tensors and Python scalars only: loadable with ``torch.load(weights_only=True)``."""
        return {
            "version": STATE_VERSION,
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
            restored = read_state(decode(state) if decode is not None else state)
        except Exception as exc:
            self.start_run()
            self.report(
                "state",
                "the monitor state saved in the checkpoint cannot be read "
                f"({type(exc).__name__}: {first_line(exc)}); its probe batch, ERF history and "
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
