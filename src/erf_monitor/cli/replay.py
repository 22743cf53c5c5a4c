"""``em.replay`` and ``erf-monitor replay``: the ERF growth of a finished run, from its checkpoints.

A run trained without the monitor still left checkpoints. :func:`replay` loads each one into
the model (weights only: ``torch.load(weights_only=True)`` or safetensors), probes it on the
same images with the monitor's own engine (:class:`~erf_monitor.monitor.engine.MonitorEngine`)
at the checkpoint's training step, and logs through the monitor's sinks: the run folder
(``metrics.csv``, heatmaps, raw maps, alerts), TensorBoard, W&B or MLflow hold exactly what a
live monitor would have logged at those steps, the coverage alerts follow the monitor's policy,
and the monitor's summary table ends the replay.

Checkpoints (:func:`find_checkpoints`): files, or folders searched recursively for

* Lightning ``.ckpt`` files (the ``state_dict`` entry; the LightningModule's attribute prefix
  such as ``model.`` is stripped),
* Hugging Face ``checkpoint-N/`` folders (``model.safetensors``, ``pytorch_model.bin`` or
  their sharded index),
* ``.pt``/``.pth``/``.bin``/``.safetensors`` state dicts.

A checkpoint's step is the ``global_step`` it stores (Lightning; Hugging Face's
``trainer_state.json``), else the last integer in its name (``step_300.pt``); checkpoints are
probed in step order.

Under ``torchrun`` (a process group is running) the checkpoints are shared: each process
probes its share and rank 0 publishes every result in step order, alone writing.

``skip_existing`` resumes an interrupted replay: the engine's state (probe batch, history,
alert state) is saved in the run folder after every probe (:data:`STATE_FILE`), and steps
probed already are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from typing_extensions import Unpack

from erf_monitor.cli.batch import settings_diff
from erf_monitor.cli.compare import CompareError, Steps, fit_state
from erf_monitor.cli.errors import CLIError
from erf_monitor.cli.models import ModelSpecError, read_weights, state_dict_of
from erf_monitor.monitor.engine import MonitorEngine
from erf_monitor.monitor.options import LayerSpec, MonitorKwargs, MonitorOptions
from erf_monitor.probe.distributed import broadcast_object, rank_and_world

__all__ = [
    "REPLAY_DEFAULTS",
    "STATE_FILE",
    "Checkpoint",
    "Replay",
    "ReplayError",
    "find_checkpoints",
    "logger_sinks",
    "read_state",
    "replay",
]

#: The engine's state in a replay's run folder (``torch.load(weights_only=True)``).
STATE_FILE = "erf_replay_state.pt"
#: replay()'s own defaults, used when no ``options`` is given: a failing probe is an error.
REPLAY_DEFAULTS: dict[str, Any] = {"strict": True, "every_n_steps": 1}

_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
_HF_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


class ReplayError(CLIError, ValueError):
    """A checkpoint or run folder that cannot be replayed (one line, no traceback in the CLI)."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a run.

    Attributes:
        step: the training step it was saved at.
        path: the file, or the Hugging Face ``checkpoint-N`` folder.
        kind: ``"lightning"``, ``"huggingface"`` or ``"state_dict"``.
    """

    step: int
    path: Path
    kind: str


@dataclass
class Replay:
    """What :func:`replay` did.

    Attributes:
        checkpoints: every checkpoint, in step order.
        probed: the steps probed by this call (``skip_existing`` leaves out those probed before).
        history: ``{layer: {step: {metric: value}}}`` of every probe of the run (the monitor's
            ``history``).
        alerts: ``{layer: step}`` of the coverage alerts that fired (the monitor's ``alerts``).
        thresholds: ``{layer: min_coverage}`` of the checked layers.
        out: the run folder (``None`` when none was given).
    """

    checkpoints: list[Checkpoint]
    probed: list[int] = field(default_factory=list)
    history: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    alerts: dict[str, int] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    out: Path | None = None


# ---------------------------------------------------------------------------------- discovery
def _last_int(name: str) -> int | None:
    numbers = re.findall(r"\d+", name)
    return int(numbers[-1]) if numbers else None


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in _HF_WEIGHTS)


def _load(path: Path, mmap: bool = False) -> Any:
    """A file's content as data: safetensors, or ``torch.load(weights_only=True)``."""
    try:
        return read_weights(path, mmap=mmap)
    except ModelSpecError as exc:  # pickled code, corrupt or foreign files: one line
        raise ReplayError(str(exc)) from None


def _stored_step(obj: Any) -> int | None:
    if isinstance(obj, Mapping):
        for key in ("global_step", "step"):
            value = obj.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at ``path`` (a file or a Hugging Face folder), with its step."""
    if path.is_dir():
        step = None
        state = path / "trainer_state.json"
        if state.is_file():
            try:
                step = _stored_step(json.loads(state.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                step = None
        kind = "huggingface"
    else:
        step = None if path.suffix == ".safetensors" else _stored_step(_load(path, mmap=True))
        kind = "lightning" if path.suffix == ".ckpt" else "state_dict"
    if step is None:
        step = _last_int(path.stem if path.is_file() else path.name)
    if step is None and path.is_file() and _is_hf_folder(path.parent):
        step = _checkpoint(path.parent).step  # checkpoint-N/model.safetensors: its folder's
    if step is None:
        raise ReplayError(
            f"cannot tell the training step of {str(path)!r}: it stores no global_step and its "
            "name holds no number (rename it, e.g. step_1000.pt)"
        )
    return Checkpoint(step, path, kind)


def find_checkpoints(paths: Sequence[str | os.PathLike[str]]) -> list[Checkpoint]:
    """The checkpoints in ``paths`` (files, or folders searched recursively), in step order.

    Files inside a Hugging Face checkpoint folder (optimizer, scheduler, RNG states) belong to
    it and are not checkpoints of their own; hidden files and a replay's own state file are
    skipped. Two checkpoints of the same step (Lightning's ``last.ckpt`` beside
    ``epoch=2-step=300.ckpt``) are probed once: the one whose name holds the step is kept, and
    a ``UserWarning`` names the other.

    Raises:
        ReplayError: a path that does not exist, a checkpoint whose step cannot be told, or
            no checkpoint at all.
    """
    found: list[Checkpoint] = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise ReplayError(f"checkpoint {str(path)!r} does not exist")
        if path.is_file():
            found.append(_checkpoint(path))
            continue
        folders = sorted(p for p in path.rglob("*") if _is_hf_folder(p))
        found += [_checkpoint(p) for p in folders]
        if _is_hf_folder(path):  # a Trainer's output_dir: its final weights, checkpoint-N/ below
            try:
                found.append(_checkpoint(path))
            except ReplayError:
                if not folders:
                    raise
                warnings.warn(
                    f"erf-monitor replay: skipped the weights in {str(path)!r} (no step known)",
                    UserWarning,
                    stacklevel=2,
                )
            folders.append(path)
        for file in sorted(path.rglob("*")):
            if (
                file.is_file()
                and file.suffix in _FILE_SUFFIXES
                and not file.name.startswith(".")
                and file.name != STATE_FILE
                and not any(f in file.parents for f in folders)
            ):
                found.append(_checkpoint(file))
    if not found:
        raise ReplayError(
            "no checkpoint found in "
            + ", ".join(repr(str(p)) for p in paths)
            + f" (looked for {', '.join(_FILE_SUFFIXES)} files and Hugging Face checkpoint-N/ "
            "folders)"
        )
    by_step: dict[int, Checkpoint] = {}
    for ck in sorted(found, key=lambda c: (c.step, _last_int(c.path.name) != c.step, c.path)):
        kept = by_step.setdefault(ck.step, ck)
        if kept is not ck:
            warnings.warn(
                f"erf-monitor replay: {str(ck.path)!r} holds step {ck.step} like "
                f"{str(kept.path)!r}; probed once",
                UserWarning,
                stacklevel=2,
            )
    return [by_step[s] for s in sorted(by_step)]


def read_state(ck: Checkpoint) -> Mapping[str, torch.Tensor]:
    """The weights of a checkpoint, read as data (never code).

    Raises:
        ReplayError: an unreadable file, or one that holds no mapping of names to tensors.
    """
    if ck.kind == "huggingface":
        index = next((ck.path / n for n in _HF_WEIGHTS[2:] if (ck.path / n).is_file()), None)
        if index is None:
            file = next(ck.path / n for n in _HF_WEIGHTS[:2] if (ck.path / n).is_file())
            return _tensors(_load(file), file)
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ReplayError(f"cannot read the shard index {str(index)!r}: {exc}") from None
        state: dict[str, torch.Tensor] = {}
        for name in shards:
            state.update(_tensors(_load(ck.path / Path(name).name), ck.path / name))
        return state
    return _tensors(_load(ck.path), ck.path)


def _tensors(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    try:
        return state_dict_of(obj, path)
    except ModelSpecError as exc:
        raise ReplayError(str(exc)) from None


# ---------------------------------------------------------------------------------- replay
def _fingerprint(model: nn.Module, inputs: torch.Tensor, opts: MonitorOptions) -> dict[str, Any]:
    """What a resumed replay must share with the run it continues."""
    data = inputs.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    digest = hashlib.sha1(data).hexdigest()
    return {
        "model": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "inputs": [list(inputs.shape), digest[:16]],
        "layers": opts.layers if isinstance(opts.layers, str) else list(opts.layers),
        "mode": opts.mode,
        "position": repr(opts.position),
        "min_coverage": repr(opts.min_coverage),
        "patience": opts.patience,
        "metrics": repr(opts.metrics),
        "prefix": opts.prefix,
    }


def _save_state(path: Path, request: Mapping[str, Any], engine: MonitorEngine) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"request": json.dumps(dict(request)), "engine": engine.state_dict()}, tmp)
    os.replace(tmp, path)


def _resume(path: Path, request: Mapping[str, Any], engine: MonitorEngine) -> None:
    state = _load(path)
    before = json.loads(state.get("request", "{}")) if isinstance(state, Mapping) else {}
    if before != dict(request):
        diff = settings_diff(before, request)
        raise ReplayError(
            f"skip_existing: {str(path.parent)!r} holds a replay made with other settings "
            f"({diff}); delete that folder or write to another one"
        )
    engine.load_state_dict(state["engine"])


def replay(
    model: nn.Module,
    checkpoints: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    layers: LayerSpec | None = None,
    *,
    inputs: torch.Tensor,
    out: str | os.PathLike[str] | None = None,
    logger: Any = None,
    skip_existing: bool = False,
    progress: Steps | None = None,
    load: Callable[[nn.Module, Checkpoint], None] | None = None,
    options: MonitorOptions | None = None,
    **kwargs: Unpack[MonitorKwargs],
) -> Replay:
    """The ERF growth of a finished run: probe each of its checkpoints as a live monitor would.

    Every checkpoint is loaded into ``model`` (weights only) and probed on ``inputs`` at its
    training step by the monitor's engine, which logs to the run folder ``out`` (a
    :class:`~erf_monitor.sinks.FileSink`: ``metrics.csv``, heatmaps, raw maps, alerts) and to
    ``logger``, evaluates the coverage alerts and prints the summary table at the end.

    Args:
        model: the architecture the checkpoints were saved from (its weights are replaced,
            checkpoint after checkpoint; the last one stays loaded).
        checkpoints: checkpoint files or folders (see :func:`find_checkpoints`).
        layers: see :attr:`MonitorOptions.layers <erf_monitor.MonitorOptions>`.
        inputs: the probe images ``(N, C, *S)``, the same for every checkpoint (all of them
            are probed: ``num_samples`` is their number).
        out: the run folder (``None``: no files, unless ``logger`` writes some).
        logger: more sinks, as ``watch(logger=...)`` takes them (a ``SummaryWriter``, a wandb
            run, a directory, a function, a Sink, or a list of these).
        skip_existing: resume a replay into ``out``: steps it probed already are skipped (its
            settings must be the same). Without it, a folder that holds a run is refused.
        progress: where to report each checkpoint (``erf_monitor.cli.compare``'s
            ``RichSteps`` or ``LineSteps``).
        load: ``load(model, checkpoint)`` puts a checkpoint's weights into the model
            (default: :func:`read_state`, then a strict load with the key prefix stripped).
        options: shared :class:`~erf_monitor.MonitorOptions`; keyword arguments override its
            fields.
        **kwargs: any other field of :class:`~erf_monitor.MonitorOptions` (``min_coverage``,
            ``mode``, ``position``, ``summary``...). Here ``strict`` defaults to ``True``
            (a probe that fails is an error) when no ``options`` is given.

    Returns:
        A :class:`Replay`: the checkpoints in step order, the history and the alerts.

    Raises:
        ReplayError: no checkpoint, one that cannot be read or does not fit ``model``, or a
            run folder that holds another run.

    Examples:
        >>> import tempfile, torch, erf_monitor as em
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 4, 3))
        >>> ckpts = tempfile.mkdtemp()
        >>> for step in (10, 20):
        ...     torch.save(net.state_dict(), f"{ckpts}/step_{step}.pt")
        >>> run = em.replay(net, ckpts, ["1"], inputs=torch.randn(2, 1, 16, 16),
        ...                 min_coverage=None, summary=False)
        >>> sorted(run.history["1"]), run.history["1"][20]["trf_size"]
        ([10, 20], 5.0)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 3:
        raise TypeError("inputs must be a tensor (N, C, *spatial) of probe images")
    if "probe_inputs" in kwargs or "num_samples" in kwargs:
        raise TypeError("replay() probes `inputs`: pass no probe_inputs or num_samples")
    found = find_checkpoints(
        [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else checkpoints
    )
    opts = MonitorOptions.build(
        options,
        {**kwargs, "probe_inputs": inputs, "num_samples": int(inputs.shape[0])},
        REPLAY_DEFAULTS,
        layers=layers,
    )
    engine = MonitorEngine(opts)
    engine.check_layers(model)
    request = _fingerprint(model, inputs, opts)
    folder = None if out is None else Path(out)
    state_path = None if folder is None else folder / STATE_FILE
    rank, world = rank_and_world()
    error = None
    if rank == 0 and folder is not None and state_path is not None:  # rank 0 decides
        try:
            if skip_existing and state_path.is_file():
                _resume(state_path, request, engine)
            elif skip_existing and (folder / "metrics.csv").exists():
                raise ReplayError(
                    f"{str(folder)!r} holds a run that cannot be resumed (no {STATE_FILE}: not "
                    "a replay, or one stopped before its first probe ended); delete it or "
                    "write to another folder"
                )
            elif (folder / "metrics.csv").exists() or state_path.exists():
                raise ReplayError(
                    f"{str(folder)!r} holds a run already; resume it (skip_existing=True, "
                    "--skip-existing) or write to another folder"
                )
        except ReplayError as exc:
            error = str(exc)
    error, done = broadcast_object((error, sorted(engine.probe_times)))
    if error is not None:
        raise ReplayError(error)
    todo = [ck for ck in found if ck.step not in done]  # the rest: probed by a resumed replay
    from erf_monitor.sinks import FileSink, Sink, as_sink

    sinks: list[Sink] = []
    if rank == 0:  # the process that logs
        sinks = [] if folder is None else [FileSink(folder)]
        if logger is not None:
            loggers = logger if isinstance(logger, (list, tuple)) else [logger]
            sinks += [as_sink(lg) for lg in loggers]
    engine.set_sinks(sinks)
    run = Replay(checkpoints=found, out=folder)
    loader = load or _load_into
    try:
        if world > 1:
            _replay_shared(engine, model, todo, loader, run, progress, state_path, request)
        else:
            for ck in todo:
                if progress is not None:
                    progress.start(f"step {ck.step}: {ck.path.name}")
                loader(model, ck)
                if engine.probe(model, ck.step).results is not None:  # strict=False: skipped
                    run.probed.append(ck.step)
                if state_path is not None:
                    _save_state(state_path, request, engine)
                if progress is not None:
                    progress.done()
        if rank == 0:
            engine.end()  # the alert policy's end-of-training decision, as a live monitor's
            engine.print_summary()
    finally:
        engine.close()
    run.history = engine.history
    run.alerts = dict(engine.alerted)
    run.thresholds = dict(engine._thresholds)
    return run


def _replay_shared(
    engine: MonitorEngine,
    model: nn.Module,
    todo: list[Checkpoint],
    loader: Callable[[nn.Module, Checkpoint], None],
    run: Replay,
    progress: Steps | None,
    state_path: Path | None,
    request: Mapping[str, Any],
) -> None:
    """Several processes (torchrun): rank ``r`` probes checkpoints ``r, r + world, ...``;
    rank 0 gathers the results and publishes them in step order through ``engine`` (its
    sinks, history and alert policy), as if it had probed them itself."""
    import torch.distributed as dist

    from erf_monitor.monitor.outcome import ProbeOutcome

    rank, world = rank_and_world()
    # Probes only: no sinks, no alerts, no summary (rank 0's engine does those).
    worker = MonitorEngine(
        engine.options.replace(min_coverage=None, summary=False, distributed_probe=False)
    )
    mine: list[tuple[int, Any, float]] = []
    error = None
    try:
        for ck in todo[rank::world]:
            if progress is not None:
                progress.start(f"step {ck.step}: {ck.path.name} (rank {rank} of {world})")
            loader(model, ck)
            outcome = worker.probe(model, ck.step)
            if outcome.results is not None:  # strict=False: a failed probe is skipped
                mine.append((ck.step, outcome.results, outcome.seconds))
            if progress is not None:
                progress.done()
    except Exception as exc:  # every rank must reach the gather below
        error = f"rank {rank}: {type(exc).__name__}: {' '.join(str(exc).split())}"
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (mine, error))
    errors = [e for _, e in gathered if e is not None]
    if errors:
        raise ReplayError("; ".join(errors))
    if rank != 0:
        run.probed = [step for step, _, _ in mine]
        dist.barrier()  # the ranks end together: none leaves while rank 0 still publishes
        return
    try:
        # The engine's own publishing path (sinks, history, alerts); its plan gives the alert
        # thresholds of the resolved layers.
        engine._prepare(model)
        everything = sorted((x for m, _ in gathered for x in m), key=lambda x: x[0])
        for step, results, seconds in everything:
            engine.last_probe_step = step
            engine._publish(ProbeOutcome(step), results, seconds)
            run.probed.append(step)
            if state_path is not None:
                _save_state(state_path, request, engine)
    finally:
        dist.barrier()


def _load_into(model: nn.Module, ck: Checkpoint) -> None:
    try:
        fit_state(model, read_state(ck), ck.path)
    except CompareError as exc:
        raise ReplayError(str(exc)) from None


# ---------------------------------------------------------------------------------- loggers
def logger_sinks(kind: str | None, out: Path) -> tuple[list[Any], Callable[[], None]]:
    """The sinks of ``erf-monitor replay --logger`` (besides the run folder's file sink), and
    what ends their runs: ``tensorboard`` writes event files to ``out/erf``, ``wandb`` a run
    in ``out`` (offline unless W&B is configured), ``mlflow`` a run in ``MLFLOW_TRACKING_URI``
    (default: the sqlite store ``out/mlflow.db``, artifacts in ``out/mlartifacts``)."""
    if kind in (None, "", "csv"):
        return [], lambda: None
    from erf_monitor.sinks import TB_SUBDIR, MLflowSink, TensorBoardSink, WandbSink

    if kind == "tensorboard":
        return [TensorBoardSink(out / TB_SUBDIR)], lambda: None
    if kind == "wandb":
        WandbSink()  # raises the install hint when wandb is missing
        import wandb

        run = wandb.init(
            dir=str(out),
            project=os.environ.get("WANDB_PROJECT", "erf-monitor"),
            name=out.resolve().name,
            job_type="erf-replay",
            reinit="create_new",
        )
        return [WandbSink(run)], run.finish
    if kind == "mlflow":
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ReplayError("--logger mlflow needs mlflow: pip install mlflow") from None
        local = out.resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{local / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("erf-monitor")
        exp_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(
                "erf-monitor", artifact_location=(local / "mlartifacts").as_uri()
            )
        )
        mlrun = client.create_run(exp_id, run_name=out.resolve().name)
        run_id = mlrun.info.run_id
        return [MLflowSink(client, run_id)], lambda: client.set_terminated(run_id)
    raise ReplayError(f"unknown --logger {kind!r}; use csv, tensorboard, wandb or mlflow")
