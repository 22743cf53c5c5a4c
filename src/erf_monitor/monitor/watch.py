"""``watch()``: the ERF monitor for plain PyTorch training loops (no Lightning needed)."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from typing_extensions import Unpack

from erf_monitor.monitor.capture import BatchCapture
from erf_monitor.monitor.engine import MonitorEngine
from erf_monitor.monitor.options import LayerSpec, MonitorKwargs, MonitorOptions
from erf_monitor.monitor.view import EngineView

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from erf_monitor.measure.result import ERFResults

__all__ = ["WATCH_DEFAULTS", "Watcher", "watch"]

#: watch()'s own defaults, used when no ``options`` is given: plain loops are often short.
WATCH_DEFAULTS: dict[str, Any] = {"every_n_steps": 100}


class Watcher(EngineView):
    """Probes a model's ERF every ``every_n_steps`` steps of a plain PyTorch loop.

    Create it with :func:`watch`. Steps are counted by the optimizer's step hook when an
    optimizer is given (the loop stays unchanged), otherwise by calling :meth:`step` after
    each optimizer step. With ``probe_inputs="train"`` the probe batch is the first
    ``num_samples`` images of the first batch the model is called with (a detached copy taken
    by a forward pre-hook; a batch with NaN or Inf values is passed over for the next one).

    **When it probes.** Only at step boundaries, never inside a forward call of yours: the
    first probe (step 0, on the parameters not updated yet) just before the first optimizer
    step after the batch was captured, then after optimizer steps. Without an optimizer the
    watcher sees no boundary before the first update: its first probe runs at the first
    :meth:`step` and is recorded at step 1 (call :meth:`probe` before your first optimizer
    step for a step-0 probe). A closure-driven step (``LBFGS``) runs the forward inside
    ``optimizer.step``: the first probe then also comes at step 1. Your own forward hooks
    fire during a probe's forward; :func:`erf_monitor.is_probing` tells the two apart.

    **Threads.** The probe runs in the thread that steps the optimizer (or calls
    :meth:`step`); its hooks act only there, so other threads' forwards of the model (an
    evaluation or serving thread) are untouched. Module flags (``training``), buffers and the
    random streams are process-wide: a probe puts them back afterwards, so another thread
    must not *train* the model while a probe runs (see the plain-PyTorch guide, "Threads").

    Everything else (keys, coverage alert, failure policy) is as in
    :class:`~erf_monitor.ERFMonitor`; ``on_insufficient="stop"`` sets :attr:`should_stop`,
    which the loop may check.

    **Distributed.** Under DDP create the watcher on rank 0 only, on the unwrapped module
    (the probe then runs no collective). When every rank probes together (sharded FSDP2
    parameters, or ``distributed_probe=True``) create it on *every* rank, with the same
    options and an ``optimizer``: the step-0 probe then runs just before the first optimizer
    step (never inside a forward), rank 0 logs, and ``should_stop`` is rank 0's decision on
    every rank.

    Attributes:
        model: the watched model.
        global_step: optimizer steps counted so far.
        should_stop: set when a coverage alert fired with ``on_insufficient="stop"``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec | None = None,
        *,
        logger: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        options: MonitorOptions | None = None,
        **kwargs: Unpack[MonitorKwargs],
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        model = _unwrap(model)
        if optimizer is not None and not hasattr(optimizer, "register_step_post_hook"):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        opts = MonitorOptions.build(options, kwargs, WATCH_DEFAULTS, layers=layers)
        if opts.source == "val":
            raise ValueError(
                "watch() has no validation loader: pass probe_inputs='train', 'noise' or a tensor."
            )
        self._engine = MonitorEngine(opts)
        self._engine.check_layers(model)
        self.model = model
        self.global_step = 0
        self.should_stop = False
        self._handles: list[RemovableHandle] = []
        self._capture: BatchCapture | None = None
        self._first_probe_done = False  # (the first probe follows the capture of the batch)
        if logger is not None:
            from erf_monitor.sinks import as_sink

            loggers = logger if isinstance(logger, (list, tuple)) else [logger]
            self._engine.set_sinks([as_sink(lg) for lg in loggers])
        if optimizer is not None:
            inner = _hookable(optimizer)
            self._handles.append(inner.register_step_pre_hook(self._before_optimizer_step))
            self._handles.append(inner.register_step_post_hook(self._on_optimizer_step))
        if self._engine.needs_batch:
            self._capture = BatchCapture(self._engine, model)

    # ------------------------------------------------------------------ stepping
    def step(self) -> ERFResults | None:
        """Count one optimizer step; probe if a multiple of ``every_n_steps`` is reached.

        Returns:
            The probe's results when this step probed, else ``None``.
        """
        self.global_step += 1
        if self._first_probe_due():  # no optimizer: the first boundary after the capture
            return self.probe()
        if self._engine.should_probe(self.global_step):
            return self._probe()
        return None

    def probe(self) -> ERFResults | None:
        """Probe now, at the current step (unless this step was probed already)."""
        if self._engine.should_probe(self.global_step, force=True):
            return self._probe()
        return None

    def _probe(self) -> ERFResults | None:
        from erf_monitor.probe.distributed import agree

        engine = self._engine
        outcome, stop = engine.probe_and_act(
            self.model, self.global_step, logs=True,
            agree=agree if engine.all_ranks_probe(self.model) else None,
        )  # fmt: skip
        if stop:
            self.should_stop = True
        return outcome.results

    def _before_optimizer_step(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        if self._first_probe_due():  # step 0: the parameters are not updated yet
            self.probe()

    def _on_optimizer_step(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        self.step()

    def _first_probe_due(self) -> bool:
        """At a step boundary: whether the first probe is due (the batch was just captured).

        When every rank probes together (FSDP2...) all ranks must decide alike, so there the
        first forward each rank saw decides, whether or not its batch was taken (the probe
        uses rank 0's batch, and is skipped on every rank while rank 0 has none).
        """
        capture = self._capture
        if capture is None:
            return False
        if capture.done:
            capture.remove()  # here, never inside a forward (see BatchCapture)
        if self._first_probe_done:
            return False
        if self._engine.all_ranks_probe(self.model):
            due = capture.seen
        else:
            due = self._engine.probe_batch is not None
        self._first_probe_done = due
        return due

    # ------------------------------------------------------------------ lifecycle
    def _remove_capture_hook(self) -> None:
        if self._capture is not None:
            self._capture.remove()

    def remove(self) -> None:
        """Remove every hook this watcher registered and release its sinks (idempotent)."""
        self._remove_capture_hook()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        try:
            self._engine.close()
        finally:
            self._engine.set_sinks(())

    def close(self) -> None:
        """Probe once more at the current step (the end of training), make the coverage
        alert's final decision, print the summary table (unless ``summary=False``), then
        :meth:`remove`. With ``on_insufficient="raise"`` an alert of that decision is raised
        (:class:`~erf_monitor.ERFCoverageWarning`) once all that is done."""
        from erf_monitor.probe.distributed import agree

        try:
            self.probe()
            all_ranks = self._engine.all_ranks_probe(self.model)
            try:  # the alert policy's final decision
                self._engine.end(agree=agree if all_ranks else None)
            finally:
                self._engine.print_summary()
        finally:
            self.remove()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.remove()

    def state_dict(self) -> dict[str, Any]:
        """Probe batch, history, alert state and step count (tensors and Python scalars)."""
        return {**self._engine.state_dict(), "global_step": self.global_step}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        if self._engine.load_state_dict(state_dict):  # else: reported, the monitor starts afresh
            self.global_step = int(state_dict.get("global_step", self.global_step))
            self._first_probe_done = True  # resumed: the schedule goes on
        if self._engine.probe_batch is not None:
            self._remove_capture_hook()

    def __repr__(self) -> str:
        return (
            f"Watcher({type(self.model).__name__}, layers={self._engine.layers!r}, "
            f"every_n_steps={self.every_n_steps}, step={self.global_step})"
        )


#: Wrappers whose ``.module`` is the model they run (layer names are the inner model's).
_WRAPPERS = ("_FabricModule", "DistributedDataParallel", "DataParallel")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside Fabric's ``_FabricModule`` and DDP/DP wrappers (their hooks and
    collectives are not needed to probe it; a sharded FSDP2 model is sharded in place)."""
    for _ in range(4):
        inner = getattr(model, "module", None)
        if type(model).__name__ not in _WRAPPERS or not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _hookable(optimizer: Any) -> Any:
    """The torch optimizer whose step hooks fire when ``optimizer`` steps.

    Wrappers such as Accelerate's ``AcceleratedOptimizer`` (``.optimizer``) or Lightning's
    ``LightningOptimizer`` (``._optimizer``) step the optimizer they wrap, and only on real
    optimizer steps (not on skipped gradient-accumulation micro-steps): hook that one.
    """
    for _ in range(4):
        if hasattr(optimizer, "_optimizer_step_post_hooks"):
            return optimizer
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None:
            break
        optimizer = inner
    return optimizer


def watch(
    model: nn.Module,
    layers: LayerSpec | None = None,
    *,
    logger: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    options: MonitorOptions | None = None,
    **kwargs: Unpack[MonitorKwargs],
) -> Watcher:
    """Watch a model's ERF in a plain PyTorch training loop.

    Args:
        model: the model being trained; Fabric's wrapper (``fabric.setup``) and DDP are
            looked through (layer names are those of the model inside).
        layers: see :attr:`MonitorOptions.layers <erf_monitor.MonitorOptions>`
            (default ``"auto"``).
        logger: where to log: a ``SummaryWriter``, a wandb run, a directory (CSV/PNG/npz
            files), a function ``fn(step, scalars, images)``, a Sink, or a list of these;
            ``None`` keeps results in :attr:`Watcher.history` only.
        optimizer: count steps through ``optimizer.register_step_post_hook`` (the loop is
            unchanged); wrappers (``accelerator.prepare``'d, Fabric's, Lightning's) are
            followed to the optimizer they step. Without it call :meth:`Watcher.step` after
            each optimizer step.
        options: shared :class:`~erf_monitor.MonitorOptions`; keyword arguments override
            its fields.
        **kwargs: any other field of :class:`~erf_monitor.MonitorOptions`
            (``every_n_steps`` (default 100 here when no ``options`` is given),
            ``num_samples``, ``min_coverage``, ``mode``...). ``probe_inputs="val"`` is not
            available: a plain loop has no validation loader the watcher could see.

    Returns:
        A :class:`Watcher`; use it as a context manager or call :meth:`Watcher.close` (final
        probe + remove hooks) or :meth:`Watcher.remove` when done.

    Examples:
        >>> import tempfile, torch, erf_monitor as em
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
        ...     torch.nn.Conv2d(4, 1, 3, padding=1))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.01)
        >>> logdir = tempfile.mkdtemp()
        >>> with em.watch(net, layers=["2"], every_n_steps=2, logger=logdir,
        ...               optimizer=opt, num_samples=2, min_coverage=None,
        ...               summary=False) as w:  # no end-of-training table here
        ...     for _ in range(4):
        ...         opt.zero_grad()
        ...         net(torch.randn(2, 1, 16, 16)).pow(2).mean().backward()
        ...         opt.step()
        >>> sorted(w.history["2"])  # fit start, every 2 steps
        [0, 2, 4]
        >>> w.history["2"][4]["trf_size"]
        5.0
    """
    return Watcher(model, layers, logger=logger, optimizer=optimizer, options=options, **kwargs)
