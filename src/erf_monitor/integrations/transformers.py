"""``ERFTrainerCallback``: the ERF monitor for Hugging Face's ``transformers.Trainer``.

All the work is done by :class:`~erf_monitor.monitor.engine.MonitorEngine`; this module maps the
Trainer's events onto it and finds where the Trainer reports to.
"""

from __future__ import annotations

import inspect
import logging
import sys
import warnings
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from typing_extensions import Unpack

from erf_monitor.core.imports import package_available
from erf_monitor.monitor.engine import EngineView, MonitorEngine
from erf_monitor.monitor.options import LayerSpec, MonitorKwargs, MonitorOptions
from erf_monitor.sinks import FileSink, MLflowSink, Sink, TensorBoardSink, WandbSink, as_sink
from erf_monitor.sinks._tensorboard import TB_SUBDIR

if TYPE_CHECKING or package_available("transformers"):
    from transformers import TrainerCallback as _CallbackBase
else:
    _CallbackBase = object

__all__ = ["STATE_FILE", "ERFTrainerCallback"]

log = logging.getLogger("erf_monitor")

#: File that :class:`ERFTrainerCallback` writes into each Trainer checkpoint directory.
STATE_FILE = "erf_monitor.pt"


def _pixel_values_forward(model: nn.Module, x: torch.Tensor) -> Any:
    return model(pixel_values=x)


class ERFTrainerCallback(EngineView, _CallbackBase):
    """Measure the effective receptive field of chosen layers while a ``transformers.Trainer``
    trains.

    Every ``every_n_steps`` optimizer steps (``state.global_step``; with gradient accumulation
    after optimizer steps only), once at train begin and once at the end, the centre-pixel ERF
    of ``layers`` is computed on a fixed probe batch and logged with the same keys as
    :class:`~erf_monitor.ERFMonitor` (``erf/<layer>/coverage``, ``erf/<layer>/heatmap``...).

    **Where it logs.** To whatever the Trainer reports to: ``report_to="tensorboard"`` (an
    event file of the monitor's own in ``<the Trainer's TensorBoard run>/erf``, a run beside
    the loss's; never the Trainer's writer, which a failed write would poison), ``"wandb"``
    (the run of its ``WandbCallback``; records also carry ``train/global_step``) and
    ``"mlflow"`` (the active
    run of its ``MLflowCallback``). Without any of these (``report_to="none"``), to
    ``<output_dir>/erf`` (CSV, PNG and ``.npz`` files). ``sinks=`` adds destinations.

    **Probe batch.** ``probe_inputs="train"`` takes the first ``num_samples`` images of the
    batch the training dataloader yields first, rebuilt from its sampler, dataset and
    collator so that the dataloader, its sampler's generator and every global RNG are left
    exactly as they were. Batches are dicts: the image is found under ``pixel_values`` (or
    ``input_key``). ``"val"`` is not available (the Trainer shows callbacks no evaluation
    loader at train begin): use ``"train"``, ``"noise"`` or a tensor.

    **Models.** HF vision models take ``pixel_values=`` and return a ``ModelOutput``: when the
    model's ``forward`` has a ``pixel_values`` parameter and no ``forward_fn`` is given, the
    probe calls ``model(pixel_values=x)``. Watch layers whose output is a tensor (e.g. a
    stage's convolution) or pass a ``forward_fn``.

    **Processes.** Only the world process zero (``state.is_world_process_zero``) captures,
    probes and logs, unless every rank must probe (sharded FSDP2 parameters, or
    ``distributed_probe=True``: see the guide "Sharded models (FSDP2)").
    ``on_insufficient="stop"`` sets ``control.should_training_stop`` (the Trainer stops after
    the current step) on every rank at once; ``"raise"`` raises from ``trainer.train()``.

    **Checkpoints.** At every checkpoint the monitor's state (probe batch, history, alert
    state) is saved as ``erf_monitor.pt`` in the checkpoint directory; resuming with
    ``trainer.train(resume_from_checkpoint=...)`` from a checkpoint under ``output_dir``
    restores it, so the curves continue with the same probe images.

    Args:
        layers: see :attr:`MonitorOptions.layers <erf_monitor.MonitorOptions>`.
        options: shared options; keyword arguments override its fields.
        sinks: extra destinations (anything :func:`erf_monitor.sinks.as_sink` accepts).
        **kwargs: any other field of :class:`~erf_monitor.MonitorOptions`.

    Examples:
        >>> import erf_monitor as em
        >>> cb = em.ERFTrainerCallback(["convnext.encoder.stages.1"], every_n_steps=100)
        >>> cb.every_n_steps, cb.min_coverage
        (100, 0.05)
    """

    def __init__(
        self,
        layers: LayerSpec | None = None,
        *,
        options: MonitorOptions | None = None,
        sinks: Any = None,
        **kwargs: Unpack[MonitorKwargs],
    ) -> None:
        if not package_available("transformers"):
            raise ModuleNotFoundError(
                "ERFTrainerCallback needs transformers: pip install erf-monitor[transformers]",
                name="transformers",
            )
        opts = MonitorOptions.build(options, kwargs, layers=layers)
        if opts.source == "val":
            raise ValueError(
                "ERFTrainerCallback cannot read the evaluation loader at train begin: pass "
                "probe_inputs='train', 'noise' or a tensor."
            )
        self._engine = MonitorEngine(opts)
        self._extra_sinks = sinks

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Check the layers, connect the Trainer's writers, take the probe batch, probe."""
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            return
        engine = self._engine
        engine.check_layers(model)  # a configuration error: raised before any step
        if engine.options.forward_fn is None:
            engine.forward_fn = _pixel_values_forward if _takes_pixel_values(model) else None
        if state.global_step > 0 and engine.last_probe_step is None:
            self._restore(args, state)
        if _world_size() > 1:  # every rank must follow rank 0's schedule
            from erf_monitor.probe.distributed import broadcast_object

            engine.last_probe_step = broadcast_object(engine.last_probe_step)
        zero = state.is_world_process_zero
        engine.set_sinks(self._sinks(args, _calling_handler()) if zero else ())
        if engine.needs_batch and (zero or engine.all_ranks_probe(model)):
            loader = kwargs.get("train_dataloader")
            try:
                if loader is None:
                    raise ValueError("the Trainer passed no train_dataloader")
                from erf_monitor.inputs.first_batch import peek_first_batch

                engine.capture(peek_first_batch(loader))
            except Exception as exc:
                engine.report("capture", f"the probe batch could not be captured: {exc}", exc)
        self._maybe_probe(state, control, model, force=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Probe at multiples of ``every_n_steps``, and at the last step of training."""
        model = kwargs.get("model")
        if isinstance(model, nn.Module):
            # The Trainer's own flow callback has already decided whether this step is the
            # last one: probe it now, while the reporting callbacks' writers are still open.
            self._maybe_probe(state, control, model, force=bool(control.should_training_stop))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Probe the final model unless its step was probed, then release the sinks."""
        model = kwargs.get("model")
        try:
            if isinstance(model, nn.Module):
                self._maybe_probe(state, control, model, force=True)
            if state.is_world_process_zero:
                self._engine.print_summary()
        finally:
            try:
                self._engine.close()
            except Exception as exc:
                self._engine.report("close", f"closing the sinks failed: {exc}", exc)
            finally:
                self._engine.set_sinks(())

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Save the monitor's state into the checkpoint directory just written."""
        if not state.is_world_process_zero:
            return
        folder = _checkpoint_dir(args.output_dir, state.global_step)
        if not folder.is_dir():
            log.info("erf-monitor: no checkpoint directory %s; state not saved", folder)
            return
        try:
            torch.save(self.state_dict(), folder / STATE_FILE)
        except Exception as exc:
            self._engine.report("save", f"saving the monitor's state failed: {exc}", exc)

    def state_dict(self) -> dict[str, Any]:
        """Probe batch, history and alert state (tensors and Python scalars only)."""
        return self._engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self._engine.load_state_dict(state_dict)

    # ------------------------------------------------------------------ internals
    def _maybe_probe(self, state: Any, control: Any, model: nn.Module, *, force: bool) -> None:
        engine = self._engine
        step = int(state.global_step)
        if not engine.should_probe(step, force=force):
            return
        from erf_monitor.probe.distributed import agree

        _, stop = engine.probe_and_act(
            model, step, logs=state.is_world_process_zero,
            agree=agree if _world_size() > 1 else None,
        )  # fmt: skip
        if stop:
            control.should_training_stop = True

    def _restore(self, args: Any, state: Any) -> None:
        candidates = []
        resume = getattr(args, "resume_from_checkpoint", None)
        if isinstance(resume, str) and resume:
            candidates.append(Path(resume) / STATE_FILE)
        candidates.append(_checkpoint_dir(args.output_dir, state.global_step) / STATE_FILE)
        for path in candidates:
            if path.is_file():
                self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                log.info("erf-monitor: state restored from %s", path)
                return
        log.info(
            "erf-monitor: resumed at step %d without saved monitor state (looked for %s); "
            "a new probe batch is taken",
            state.global_step,
            ", ".join(map(str, candidates)),
        )

    def _sinks(self, args: Any, handler: Any) -> list[Sink]:
        sinks = _reporting_sinks(args, handler)
        if not sinks:
            sinks = [FileSink(Path(args.output_dir) / "erf")]
        extra = self._extra_sinks
        if extra is not None:
            sinks += [as_sink(s) for s in (extra if isinstance(extra, (list, tuple)) else [extra])]
        return sinks


def _takes_pixel_values(model: nn.Module) -> bool:
    try:
        return "pixel_values" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _world_size() -> int:
    from erf_monitor.probe.distributed import rank_and_world

    return rank_and_world()[1]


def _checkpoint_dir(output_dir: str, step: int) -> Path:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{int(step)}"


def _calling_handler() -> Any:
    """The Trainer's ``CallbackHandler`` that is calling this callback's event, if any.

    Callbacks are not given the Trainer or the other callbacks, but the Trainer's reporting
    callbacks hold its writers and runs; the handler that calls us holds them all.
    """
    from transformers.trainer_callback import CallbackHandler

    frame: FrameType | None = sys._getframe(1)
    for _ in range(6):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, CallbackHandler):
            return owner
        frame = frame.f_back
    return None


def _trainer_tensorboard_sink(callback: Any, args: Any) -> TensorBoardSink:
    """The monitor's own event file in ``<the Trainer's TensorBoard run>/erf``.

    Never the ``TensorBoardCallback``'s writer itself (see :mod:`erf_monitor.sinks._tensorboard`:
    a failed write would poison it), so it does not matter that the Trainer closes that writer
    in ``on_train_end`` before a final probe: TensorBoard shows the ERF run beside the loss.
    """
    writer = getattr(callback, "tb_writer", None)
    log_dir = getattr(writer, "log_dir", None) or getattr(args, "logging_dir", None)
    run = Path(log_dir) if log_dir else Path(args.output_dir) / "runs"
    return TensorBoardSink(run / TB_SUBDIR)


def _reporting_sinks(args: Any, handler: Any) -> list[Sink]:
    """Sinks on the writers/runs of the Trainer's reporting callbacks (``report_to``)."""
    from transformers.integrations import integration_utils as hf

    if handler is None:  # not called by a Trainer's CallbackHandler: nothing to reuse
        return []
    sinks: list[Sink] = []
    unsupported: list[str] = []
    for cb in handler.callbacks:
        if isinstance(cb, hf.TensorBoardCallback):
            sinks.append(_trainer_tensorboard_sink(cb, args))
        elif isinstance(cb, hf.WandbCallback):
            sinks.append(WandbSink(None, extra_step_keys=("train/global_step",)))
        elif isinstance(cb, hf.MLflowCallback):  # also DagsHubCallback
            import mlflow

            run = mlflow.active_run()
            if run is None:
                unsupported.append(f"{type(cb).__name__} (no active run)")
            else:
                client = mlflow.MlflowClient(tracking_uri=mlflow.get_tracking_uri())
                sinks.append(MLflowSink(client, run.info.run_id))
        elif type(cb) in hf.INTEGRATION_TO_CALLBACK.values():
            unsupported.append(type(cb).__name__)
    if unsupported:
        warnings.warn(
            f"erf-monitor: no sink for the Trainer's {', '.join(unsupported)}; ERF data is not "
            "sent there. Supported: tensorboard, wandb, mlflow (or pass sinks=).",
            UserWarning,
            stacklevel=3,
        )
    return sinks
