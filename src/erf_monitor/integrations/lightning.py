"""``ERFMonitor``: the Lightning callback (``lightning.pytorch`` and ``pytorch_lightning``).

The class inherits from the ``Callback`` of every Lightning package that is installed, so one
object is accepted by ``lightning.pytorch.Trainer`` and by ``pytorch_lightning.Trainer`` alike.
All the work is done by the framework-free :class:`~erf_monitor.monitor.engine.MonitorEngine`; this
module only maps Trainer hooks onto it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from typing_extensions import Unpack, override

from erf_monitor.core.errors import ERFCoverageWarning
from erf_monitor.core.imports import LIGHTNING_AVAILABLE, PL_AVAILABLE
from erf_monitor.core.rng import preserved_rng
from erf_monitor.monitor.engine import MonitorEngine
from erf_monitor.monitor.options import LayerSpec, MonitorKwargs, MonitorOptions
from erf_monitor.monitor.view import EngineView

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch import Callback as _CallbackBase

else:

    def _callback_bases() -> tuple[type, ...]:
        bases = []
        for available, module in (
            (LIGHTNING_AVAILABLE, "lightning.pytorch"),
            (PL_AVAILABLE, "pytorch_lightning"),
        ):
            if available:
                with contextlib.suppress(ImportError):  # a broken install counts as absent
                    bases.append(importlib.import_module(module).Callback)
        return tuple(bases) or (object,)

    _CallbackBase = type("_CallbackBase", _callback_bases(), {})

__all__ = ["ERFMonitor"]

log = logging.getLogger("erf_monitor")


class ERFMonitor(EngineView, _CallbackBase):
    """Measure the effective receptive field of chosen layers while a LightningModule trains.

    Every ``every_n_steps`` optimizer steps (and once at fit start and once at fit end) the
    centre-pixel ERF of ``layers`` is computed on a fixed probe batch and logged to every
    logger of the Trainer (TensorBoard, W&B, CSV, MLflow) under the same keys:

    * ``erf/<layer>/<metric>`` scalars: by default ``erf_size``, ``coverage``,
      ``erf_trf_ratio``, ``area_t50``, ``sigma_y/x`` and ``centroid_offset_y/x`` (every other
      metric of ``ERFResult.scalars()`` on request, ``metrics=``), a checked layer's
      ``min_coverage``, and ``erf/probe_time_s``, in one ``log_metrics``-like call per probe;
    * ``erf/<layer>/heatmap`` images and the raw maps (``.npz`` for file-based loggers);
    * with ``position`` other units than the centre: ``erf/<layer>/<position>/<metric>``, and
      for a set of positions ``erf/<layer>/border_ratio`` and the ``erf/<layer>/field`` image;
    * coverage alerts as text (``alerts/erf_coverage/<layer>``).

    What to probe, how often, the coverage alert and the failure policy are the shared
    :class:`~erf_monitor.MonitorOptions`, passed as ``options=`` and/or as keyword arguments
    of the same names (documented there once). Lightning specifics:

    **Steps** are ``trainer.global_step``: optimizer steps (with gradient accumulation the
    probe runs after optimizer steps only, never on micro-batches), counted over all
    optimizers. With manual optimization and two optimizers stepping every batch,
    ``global_step`` advances by 2 per batch: the probe runs at the first step at or past each
    multiple of ``every_n_steps`` (``every_n_steps=5``: steps 0, 6, 10, 16...), so choose an
    even period there.

    **One run per fit.** A ``fit`` with another Trainer or another model starts afresh (no
    history, probe batch or alert state of the previous run; ``probe_inputs`` tensors are
    kept), so one monitor object may serve several runs; ``fit`` again with the same Trainer
    and model continues. ``fit(ckpt_path=...)`` restores the checkpoint's state (probe batch,
    history, alerts) and goes on with the schedule: the checkpoint's own step is not probed
    again.

    **Probe batch.** ``probe_inputs="val"`` takes the first ``num_samples`` items of the
    validation dataset in dataset order (collated with the loader's ``collate_fn``; the loader
    itself is never iterated, so its sampler, workers and persistent iterator are untouched).
    The batch is stored in the checkpoint, so a resumed run probes the same images.

    **on_insufficient="stop"** sets ``trainer.should_stop = True``. **"raise"** raises the
    :class:`~erf_monitor.ERFCoverageWarning` out of ``fit``: during training at once; for the
    end-of-training decision once every callback's ``on_train_end`` has run (the final probe
    logged, the last checkpoint saved), from ``on_fit_end``.

    **Distributed.** Only global rank 0 captures the probe batch and probes; the probe runs no
    collective (it only differentiates the input of the unwrapped LightningModule in eval
    mode), so the other ranks never wait and no ``barrier`` is needed. With sharded
    parameters (FSDP2, e.g. ``ModelParallelStrategy``) or ``distributed_probe=True`` every
    rank probes its share of rank 0's probe batch instead (see the guide "Sharded models
    (FSDP2)"). All ranks follow the same step schedule; for ``on_insufficient="stop"`` or
    ``"raise"`` rank 0's decision is broadcast at probe steps so that every rank stops (or
    raises) together.

    **Failures.** With ``strict=False`` (default) anything failing inside the monitor (a probe
    whose gradients turn NaN, a logger that raises, a model the TRF analysis cannot follow) is
    reported once as :class:`~erf_monitor.ERFProbeWarning` and training goes on; that probe is
    skipped. Unknown layer names are configuration errors and raise ``ValueError`` in
    ``setup`` (before any training step), listing the available names.

    Args:
        layers: see :attr:`MonitorOptions.layers <erf_monitor.MonitorOptions>`.
        options: shared options; keyword arguments override its fields.
        sinks: extra destinations besides the Trainer's loggers (anything
            :func:`erf_monitor.sinks.as_sink` accepts: a directory, a ``SummaryWriter``...).
        **kwargs: any other field of :class:`~erf_monitor.MonitorOptions`
            (``every_n_steps``, ``num_samples``, ``min_coverage``, ``mode``...).

    Examples:
        >>> import erf_monitor as em
        >>> cb = em.ERFMonitor(layers=["layer2", "layer4"], every_n_steps=200, num_samples=8)
        >>> cb.every_n_steps, cb.min_coverage
        (200, 0.05)
    """

    def __init__(
        self,
        layers: LayerSpec | None = None,
        *,
        options: MonitorOptions | None = None,
        sinks: Any = None,
        **kwargs: Unpack[MonitorKwargs],
    ) -> None:
        if not (LIGHTNING_AVAILABLE or PL_AVAILABLE):
            raise ModuleNotFoundError(
                "ERFMonitor needs Lightning: pip install erf-monitor[lightning] "
                "(or use erf_monitor.watch() in a plain PyTorch loop)",
                name="lightning",
            )
        super().__init__()
        self._engine = MonitorEngine(MonitorOptions.build(options, kwargs, layers=layers))
        self._extra_sinks = sinks
        self._fit_started = False
        self._capturing = False
        self._run_of: tuple[weakref.ref[Any], weakref.ref[Any]] | None = None
        #: The end-of-training decision's error, raised from on_fit_end.
        self._insufficient: BaseException | None = None

    @property
    @override
    def state_key(self) -> str:
        """Identifies this callback's state in checkpoints (stable across runs)."""
        layers = self._engine.layers
        return self._generate_state_key(
            layers=layers if isinstance(layers, str) else tuple(layers),
            every_n_steps=self._engine.every_n_steps,
            prefix=self._engine.prefix,
        )

    # ------------------------------------------------------------------ Trainer hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the layer names against the model and connect the Trainer's loggers."""
        if stage != "fit":
            return
        self._engine.check_layers(pl_module)
        self._fit_started = False
        self._capturing = False  # still looking for a batch without NaN or Inf values
        self._insufficient = None
        self._start_run(trainer, pl_module)
        if not trainer.is_global_zero:
            self._engine.set_sinks(())
            return
        from erf_monitor.sinks import as_sink, sinks_for_trainer

        sinks = sinks_for_trainer(trainer)
        extra = self._extra_sinks
        if extra is not None:
            extra_list = extra if isinstance(extra, (list, tuple)) else [extra]
            sinks.extend(as_sink(s) for s in extra_list)
        self._engine.set_sinks(sinks)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Capture the probe batch from the first training batch (the next one while a
        batch holds NaN or Inf values); probe at fit start."""
        engine = self._engine
        first = not self._fit_started
        if not first and not self._capturing:
            return
        self._fit_started = True
        if trainer.is_global_zero and engine.probe_batch is None:
            try:
                if engine.source == "val":
                    with preserved_rng():  # the user's val_dataloader() may draw random numbers
                        loader = _val_loader(trainer)
                    engine.capture_from_loader(loader)
                elif engine.needs_batch:
                    self._capturing = not engine.capture(batch)
            except Exception as exc:
                self._capturing = False
                engine.report("capture", f"the probe batch could not be captured: {exc}", exc)
        if first:
            # Resumed: the checkpoint's step was probed (or skipped) by the run that saved it.
            self._maybe_probe(trainer, pl_module, force=not engine.resumed)
        else:  # the fit-start probe had no batch (NaN values): made up now, if it is due
            self._maybe_probe(trainer, pl_module, force=False)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Probe when ``trainer.global_step`` reached a multiple of ``every_n_steps``."""
        self._maybe_probe(trainer, pl_module, force=False)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe once more at the end of fit (unless this step was just probed), then the
        alert policy's final decision (on every rank: ``"raise"`` follows rank 0's)."""
        if not self._fit_started:
            return
        self._maybe_probe(trainer, pl_module, force=True)
        try:
            self._engine.end(logs=trainer.is_global_zero, agree=_agree(trainer))
        except ERFCoverageWarning as exc:
            # Raised from on_fit_end: the other callbacks' on_train_end (ModelCheckpoint's
            # last save...) still run.
            self._insufficient = exc

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise the end-of-training decision's error (``on_insufficient="raise"``), after
        what :meth:`teardown` does: no teardown hook runs once ``fit`` raises."""
        error, self._insufficient = self._insufficient, None
        if error is not None:
            self.teardown(trainer, pl_module, "fit")
            raise error

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Flush and release the sinks (never the loggers themselves); print the summary."""
        if stage != "fit":
            return
        self._insufficient = None
        if self._fit_started and trainer.is_global_zero:
            self._engine.print_summary()
        try:
            self._engine.close()
        except Exception as exc:
            self._engine.report("close", f"closing the sinks failed: {exc}", exc)
        finally:
            self._engine.set_sinks(())

    @override
    def state_dict(self) -> dict[str, Any]:
        """Probe batch, history and alert state (tensors and Python scalars only)."""
        return self._engine.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self._engine.load_state_dict(state_dict)

    # ------------------------------------------------------------------ internals
    def _start_run(self, trainer: Any, pl_module: Any) -> None:
        """Fresh state unless this fit continues the last one (same Trainer and model)."""
        last = self._run_of
        if last is not None and last[0]() is trainer and last[1]() is pl_module:
            self._engine.resumed = False
            return
        if self._engine.history:
            log.info(
                "erf-monitor: a new run (another Trainer or model): the monitor starts afresh "
                "(the previous run's history, probe batch and alerts are dropped)."
            )
        self._engine.start_run()
        self._run_of = (weakref.ref(trainer), weakref.ref(pl_module))

    def _maybe_probe(self, trainer: Any, pl_module: Any, *, force: bool) -> None:
        engine = self._engine
        step = int(trainer.global_step)
        if not engine.should_probe(step, force=force):
            return

        _, stop = engine.probe_and_act(
            pl_module, step, logs=trainer.is_global_zero, agree=_agree(trainer)
        )
        if stop:
            trainer.should_stop = True


def _agree(trainer: Any) -> Callable[[bool], bool] | None:
    """Rank 0's decision on every rank (``None`` on a single process)."""
    if int(getattr(trainer, "world_size", 1)) <= 1:
        return None

    def from_rank_zero(fired: bool) -> bool:
        # Every rank reaches this point at the same step: they agree on rank 0's decision.
        return bool(trainer.strategy.broadcast(fired, src=0))

    return from_rank_zero


def _val_loader(trainer: Any) -> Any:
    loaders = getattr(trainer, "val_dataloaders", None)
    if loaders is not None:
        return loaders
    # Not set up yet (no sanity check): ask the data source (the user's val_dataloader()).
    try:
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
        return source.dataloader() if source.is_defined() else None
    except AttributeError:  # pragma: no cover - Lightning internals moved
        return None
