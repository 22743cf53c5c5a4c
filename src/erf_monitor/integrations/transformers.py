"""``ERFTrainerCallback``: the ERF monitor for Hugging Face's ``transformers.Trainer``.

All the work is done by :class:`~erf_monitor.monitor.engine.MonitorEngine`; this module maps the
Trainer's events onto it and finds where the Trainer reports to.
"""

from __future__ import annotations

import base64
import datetime
import inspect
import logging
import os
import socket
import warnings
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from typing_extensions import Unpack

from erf_monitor.core.imports import package_available
from erf_monitor.monitor.capture import BatchCapture
from erf_monitor.monitor.engine import MonitorEngine
from erf_monitor.monitor.options import LayerSpec, MonitorKwargs, MonitorOptions
from erf_monitor.monitor.view import EngineView
from erf_monitor.sinks import (
    TB_SUBDIR,
    FileSink,
    MLflowSink,
    Sink,
    TensorBoardSink,
    WandbSink,
    as_sink,
)

if TYPE_CHECKING or package_available("transformers"):
    from transformers import TrainerCallback as _CallbackBase
else:
    _CallbackBase = object

__all__ = ["STATE_KEY", "ERFTrainerCallback"]

log = logging.getLogger("erf_monitor")

#: Key of the monitor's state in ``TrainerState.stateful_callbacks``, which the Trainer
#: writes into ``trainer_state.json`` of every checkpoint and reads back on resume. Not a
#: class name, so that ``restore_callback_states_from_checkpoint=True`` never replaces the
#: callback by a default-configured copy (transformers rebuilds callbacks from their class).
STATE_KEY = "erf_monitor"


def _pixel_values_forward(model: nn.Module, x: torch.Tensor) -> Any:
    return model(pixel_values=x)


class ERFTrainerCallback(EngineView, _CallbackBase):
    """Measure the effective receptive field of chosen layers while a ``transformers.Trainer``
    trains.

    Every ``every_n_steps`` optimizer steps (``state.global_step``; with gradient accumulation
    after optimizer steps only), once at train begin and once at the end, the centre-pixel ERF
    of ``layers`` is computed on a fixed probe batch and logged with the same keys as
    :class:`~erf_monitor.ERFMonitor` (``erf/<layer>/coverage``, ``erf/<layer>/heatmap``...).

    **Where it logs.** To whatever ``args.report_to`` names: ``"tensorboard"`` (an event file
    of the monitor's own in ``<the Trainer's TensorBoard run>/erf``, a run beside the loss's;
    never the Trainer's writer, which a failed write would poison), ``"wandb"`` (the active
    run, ``wandb.run``, which the ``WandbCallback`` started; records also carry
    ``train/global_step``) and ``"mlflow"`` (``mlflow.active_run()``, the ``MLflowCallback``'s
    run). Without any of these (``report_to="none"``), to ``<output_dir>/erf`` (CSV, PNG and
    ``.npz`` files). ``sinks=`` adds destinations. transformers gives a callback no
    documented access to the other callbacks or their writers, so the TensorBoard run is
    found the way ``TensorBoardCallback`` documents it: ``TENSORBOARD_LOGGING_DIR`` if set,
    else its default ``<output_dir>/runs/<date>_<host>`` (the directory of that name it
    created moments before; if there is none, the monitor creates it).

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
    the current step) on every rank at once; ``"raise"`` raises from ``trainer.train()`` (for
    the end-of-training decision from ``on_train_end``, on every rank, after the final probe
    was logged).

    **Runs and checkpoints.** Every ``train()`` starts afresh (history, probe batch and alert
    state of an earlier run are dropped). The monitor's state is kept in the Trainer's own
    state (``state.stateful_callbacks["erf_monitor"]``, written into ``trainer_state.json``
    of every checkpoint): ``trainer.train(resume_from_checkpoint=PATH)`` restores it from the
    checkpoint the Trainer loads, wherever it lies, so the curves continue with the same
    probe images; the resumed run follows the schedule (the checkpoint's own step is not
    probed again).

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
        self._forward_fn = opts.forward_fn
        self._extra_sinks = sinks
        self._capture: BatchCapture | None = None  # looking for a batch without NaN or Inf
        #: The probe batch and its JSON form (encoded once, not at every probe).
        self._encoded_batch: tuple[torch.Tensor, dict[str, Any]] | None = None

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Check the layers, start the run (or restore it), connect the sinks, probe."""
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            return
        engine = self._engine
        engine.check_layers(model)  # a configuration error: raised before any step
        self._end_capture(done_only=False)  # (of an earlier train() that failed)
        if self._forward_fn is None:  # the user's forward_fn, else one that fits this model
            forward = _pixel_values_forward if _takes_pixel_values(model) else None
            engine.options = engine.options.replace(forward_fn=forward)
        self._start_run(state)
        if _world_size() > 1:  # every rank must follow rank 0's schedule
            from erf_monitor.probe.distributed import broadcast_object

            engine.last_probe_step = broadcast_object(engine.last_probe_step)
        zero = state.is_world_process_zero
        engine.set_sinks(self._sinks(args, state) if zero else ())
        if engine.needs_batch and (zero or engine.all_ranks_probe(model)):
            loader = kwargs.get("train_dataloader")
            try:
                if loader is None:
                    raise ValueError("the Trainer passed no train_dataloader")
                from erf_monitor.inputs.first_batch import peek_first_batch

                if not engine.capture(peek_first_batch(loader)):
                    # NaN or Inf values: a later batch, copied where it flows past the
                    # model; the probe then runs at the next step's end.
                    self._capture = BatchCapture(engine, model)
            except Exception as exc:
                engine.report("capture", f"the probe batch could not be captured: {exc}", exc)
        # Resumed: the checkpoint's step was probed (or not due) in the run that saved it.
        self._maybe_probe(state, control, model, force=not engine.resumed)
        self._keep_state(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Probe at multiples of ``every_n_steps``, and at the last step of training."""
        self._end_capture(done_only=True)
        model = kwargs.get("model")
        if isinstance(model, nn.Module):
            # The Trainer's own flow callback has already decided whether this step is the
            # last one: probe it now, while the reporting callbacks' writers are still open.
            self._maybe_probe(state, control, model, force=bool(control.should_training_stop))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Probe the final model unless its step was probed, then release the sinks."""
        model = kwargs.get("model")
        self._end_capture(done_only=False)
        zero = state.is_world_process_zero
        try:
            if isinstance(model, nn.Module):
                self._maybe_probe(state, control, model, force=True)
            try:  # the alert policy's final decision ("raise": every rank follows rank 0's)
                self._engine.end(logs=zero, agree=_agree())
            finally:
                if zero:
                    self._engine.print_summary()
        finally:
            try:
                self._engine.close()
            except Exception as exc:
                self._engine.report("close", f"closing the sinks failed: {exc}", exc)
            finally:
                self._engine.set_sinks(())

    def state_dict(self) -> dict[str, Any]:
        """Probe batch, history and alert state (tensors and Python scalars only)."""
        return self._engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self._engine.load_state_dict(state_dict)

    # ------------------------------------------------------------------ internals
    def _end_capture(self, *, done_only: bool) -> None:
        """Remove the capture hook (at a step boundary, never inside a forward)."""
        capture = self._capture
        if capture is not None and (capture.done or not done_only):
            capture.remove()
            self._capture = None

    def _maybe_probe(self, state: Any, control: Any, model: nn.Module, *, force: bool) -> None:
        engine = self._engine
        step = int(state.global_step)
        if not engine.should_probe(step, force=force):
            return
        zero = state.is_world_process_zero
        _, stop = engine.probe_and_act(model, step, logs=zero, agree=_agree())
        if stop:
            control.should_training_stop = True
        self._keep_state(state)

    def _start_run(self, state: Any) -> None:
        """A fresh run, or, resuming, the state saved in the checkpoint the Trainer loaded."""
        self._engine.start_run()
        self._encoded_batch = None
        if state.global_step == 0:
            return
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        if saved is not None:  # unreadable state is reported and the monitor starts afresh
            if self._engine.load_state_dict(saved, decode=_decode_state):
                log.info(
                    "erf-monitor: state restored from the checkpoint (step %d)", state.global_step
                )
        else:
            log.info(
                "erf-monitor: resumed at step %d from a checkpoint without monitor state; "
                "a new probe batch is taken",
                state.global_step,
            )

    def _keep_state(self, state: Any) -> None:
        """Put the monitor's state into the Trainer's state, which every checkpoint saves."""
        callbacks = getattr(state, "stateful_callbacks", None)
        if not state.is_world_process_zero or not isinstance(callbacks, dict):
            return
        engine_state = self._engine.state_dict()
        batch = engine_state.pop("probe_batch")
        cached = self._encoded_batch
        if batch is not None and (cached is None or cached[0] is not batch):
            cached = self._encoded_batch = (batch, _encode_tensor(batch))
        callbacks[STATE_KEY] = {
            **engine_state,
            "probe_batch": None if batch is None or cached is None else cached[1],
        }

    def _sinks(self, args: Any, state: Any) -> list[Sink]:
        sinks = _reporting_sinks(args, state)
        if not sinks:
            sinks = [FileSink(Path(args.output_dir) / "erf")]
        extra = self._extra_sinks
        if extra is not None:
            sinks += [as_sink(s) for s in (extra if isinstance(extra, (list, tuple)) else [extra])]
        return sinks


def _encode_tensor(x: torch.Tensor) -> dict[str, Any]:
    """A float32 tensor as JSON: its shape and its little-endian bytes, compressed."""
    data = np.ascontiguousarray(x.detach().cpu().numpy(), dtype="<f4").tobytes()
    return {"shape": list(x.shape), "float32": base64.b64encode(zlib.compress(data)).decode()}


def _decode_state(saved: Any) -> dict[str, Any]:
    """The engine state that :meth:`ERFTrainerCallback._keep_state` stored (JSON: data only)."""
    if not isinstance(saved, Mapping):
        raise TypeError(f"a {type(saved).__name__}, not a mapping")
    state = dict(saved)
    batch = state.get("probe_batch")
    if isinstance(batch, Mapping):
        raw = zlib.decompress(base64.b64decode(batch["float32"]))
        array = np.frombuffer(raw, dtype="<f4").reshape([int(n) for n in batch["shape"]])
        state["probe_batch"] = torch.from_numpy(array.astype(np.float32))
    elif batch is not None:
        raise TypeError(f"the probe batch is a {type(batch).__name__}, not encoded bytes")
    return state


def _takes_pixel_values(model: nn.Module) -> bool:
    try:
        return "pixel_values" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _world_size() -> int:
    from erf_monitor.probe.distributed import rank_and_world

    return rank_and_world()[1]


def _agree() -> Callable[[bool], bool] | None:
    """Rank 0's decision on every rank (``None`` on a single process)."""
    from erf_monitor.probe.distributed import agree

    return agree if _world_size() > 1 else None


def _tensorboard_run(args: Any, state: Any) -> Path:
    """The directory of the Trainer's TensorBoard run, as ``TensorBoardCallback`` documents it.

    ``TENSORBOARD_LOGGING_DIR`` if set; for a hyper-parameter search trial
    ``<output_dir>/runs/<date>_<host>/<trial>``; else ``<output_dir>/runs/<date>_<host>``
    (``default_logdir()``), named by the second at which the callback's ``on_train_begin``
    ran, moments before the monitor's: the newest such directory of the last few seconds.
    """
    from transformers.integrations.integration_utils import default_logdir

    env = os.getenv("TENSORBOARD_LOGGING_DIR")
    trial = state.trial_name if getattr(state, "is_hyper_param_search", False) else None
    if env and trial is None:
        return Path(os.path.expanduser(env))
    runs = Path(args.output_dir) / Path(default_logdir()).parent
    now = datetime.datetime.now()
    names = [
        (now - datetime.timedelta(seconds=s)).strftime("%b%d_%H-%M-%S") + "_" + socket.gethostname()
        for s in range(3)
    ]
    found = next((runs / n for n in names if (runs / n).is_dir()), runs / names[0])
    return found / trial if trial is not None else found


#: ``report_to`` integrations without ERF data: nothing to warn about.
_NOT_TRACKERS = ("codecarbon",)


def _reporting_sinks(args: Any, state: Any) -> list[Sink]:
    """Sinks on what ``args.report_to`` names (TensorBoard, W&B, MLflow), found through
    documented means only (see the class docstring)."""
    sinks: list[Sink] = []
    unsupported: list[str] = []
    for name in list(getattr(args, "report_to", None) or []):
        if name == "tensorboard":
            sinks.append(TensorBoardSink(_tensorboard_run(args, state) / TB_SUBDIR))
        elif name == "wandb":
            sinks.append(WandbSink(None, extra_step_keys=("train/global_step",)))
        elif name in ("mlflow", "dagshub"):  # DagsHub logs through MLflow
            import mlflow

            run = mlflow.active_run()
            if run is None:
                unsupported.append(f"{name} (no active run)")
            else:
                client = mlflow.MlflowClient(tracking_uri=mlflow.get_tracking_uri())
                sinks.append(MLflowSink(client, run.info.run_id))
        elif name not in _NOT_TRACKERS:
            unsupported.append(name)
    if unsupported:
        warnings.warn(
            f"erf-monitor: no sink for report_to={', '.join(unsupported)}; ERF data is not "
            "sent there. Supported: tensorboard, wandb, mlflow (or pass sinks=).",
            UserWarning,
            stacklevel=3,
        )
    return sinks
