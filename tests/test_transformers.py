"""ERFTrainerCallback in real ``transformers.Trainer.train()`` runs (tiny models from configs)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import erf_monitor as em
from erf_monitor.targets.auto import pick_layers
from wandb_records import wandb_history

transformers = pytest.importorskip("transformers")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from transformers import (  # noqa: E402
    ConvNextConfig,
    ConvNextForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from erf_monitor.sinks._tensorboard import tb_tag  # noqa: E402

CONVNEXT_LAYERS = [f"convnext.encoder.stages.{i}.layers.0.dwconv" for i in (0, 1)]
VIT_LAYERS = ["vit.embeddings.patch_embeddings.projection"]


class Images(Dataset):
    """Synthetic labelled images as HF batches expect them: dicts with ``pixel_values``."""

    def __init__(self, n: int = 32, size: int = 32) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def convnext() -> Any:
    torch.manual_seed(0)
    cfg = ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=4,
        image_size=32,
    )  # fmt: skip
    return ConvNextForImageClassification(cfg)


def vit() -> Any:
    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
        intermediate_size=64, num_labels=4, hidden_dropout_prob=0.2,
    )  # fmt: skip
    return ViTForImageClassification(cfg)


def args(out: Path, **kw: Any) -> TrainingArguments:
    base: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": 5,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "report_to": "none",
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    base.update(kw)
    return TrainingArguments(**base)


def train(model: Any, a: TrainingArguments, callbacks: list[Any], **kw: Any) -> Trainer:
    trainer = Trainer(model=model, args=a, train_dataset=Images(), callbacks=callbacks)
    trainer.train(**kw)
    return trainer


class FirstBatch(TrainerCallback):  # type: ignore[misc]
    """Keeps the first batch the model is trained on (a forward pre-hook)."""

    def __init__(self) -> None:
        self.batch: torch.Tensor | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        def hook(_m: Any, a: Any, k: Any) -> None:
            if self.batch is None:
                self.batch = k["pixel_values"].detach().clone()

        kw["model"].register_forward_pre_hook(hook, with_kwargs=True)


def scalars(log_dir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def test_tensorboard_run_beside_the_trainers(tmp_path: Path) -> None:
    cb = em.ERFTrainerCallback(CONVNEXT_LAYERS, every_n_steps=2, num_samples=3, min_coverage=None)
    first = FirstBatch()
    trainer = train(convnext(), args(tmp_path, report_to=["tensorboard"]), [cb, first])
    runs = sorted(p.parent for p in (tmp_path / "runs").rglob("events.out.tfevents.*"))
    # The Trainer's run (the loss) and the monitor's own run beside it, in its erf/ folder.
    assert len(runs) == 2 and runs[1] == runs[0] / "erf"
    assert "train/loss" in scalars(runs[0]).Tags()["scalars"]
    ea = scalars(runs[1])
    for layer in CONVNEXT_LAYERS:
        steps = [e.step for e in ea.Scalars(tb_tag(f"erf/{layer}/coverage"))]
        assert steps == [0, 2, 4, 5]  # train begin, every 2 optimizer steps, the end
        images = ea.Images(tb_tag(f"erf/{layer}/heatmap"))
        assert [i.step for i in images] == [0, 2, 4, 5]
        assert images[0].width > 0 and images[0].height > 0  # annotated: frame, legend, bar
        logged = [e.value for e in ea.Scalars(tb_tag(f"erf/{layer}/coverage"))]
        assert logged == pytest.approx([cb.history[layer][s]["coverage"] for s in (0, 2, 4, 5)])
    # The probe batch is the first 3 images the model was trained on, and the logged
    # numbers are those of an independent probe of the final model on them.
    assert first.batch is not None and torch.equal(cb.probe_batch, first.batch[:3])
    model = trainer.model
    again = em.compute_erf(
        model, cb.probe_batch, CONVNEXT_LAYERS, forward_fn=lambda m, x: m(pixel_values=x)
    )
    for layer in CONVNEXT_LAYERS:
        assert cb.history[layer][5]["coverage"] == pytest.approx(again[layer].coverage)
        assert cb.latest is not None
        torch.testing.assert_close(cb.latest[layer].heatmap, again[layer].heatmap)
    assert (runs[1] / "erf_maps").is_dir()  # raw maps next to the monitor's event file


def test_tensorboard_logging_dir_and_the_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without access to TensorBoardCallback's writer (transformers documents none), the run
    is found as that callback documents it: TENSORBOARD_LOGGING_DIR, else its default
    directory; when there is none (the callback removed), the monitor creates it."""
    from transformers.integrations import TensorBoardCallback

    layer = CONVNEXT_LAYERS[0]
    kw = {"every_n_steps": 2, "num_samples": 2, "min_coverage": None}
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    cb = em.ERFTrainerCallback([layer], **kw)  # type: ignore[arg-type]
    train(convnext(), args(tmp_path / "a", report_to=["tensorboard"], max_steps=2), [cb])
    assert "train/loss" in scalars(tmp_path / "tb").Tags()["scalars"]
    ours = scalars(tmp_path / "tb" / "erf")
    assert [e.step for e in ours.Scalars(tb_tag(f"erf/{layer}/coverage"))] == [0, 2]
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")
    cb = em.ERFTrainerCallback([layer], **kw)  # type: ignore[arg-type]
    trainer = Trainer(
        model=convnext(), args=args(tmp_path / "b", report_to=["tensorboard"], max_steps=2),
        train_dataset=Images(), callbacks=[cb],
    )  # fmt: skip
    trainer.remove_callback(TensorBoardCallback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.ERFProbeWarning)
        trainer.train()
    files = list((tmp_path / "b" / "runs").rglob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].parent.name == "erf"  # runs/<date>_<host>/erf
    ours = scalars(files[0].parent)
    assert [e.step for e in ours.Scalars(tb_tag(f"erf/{layer}/coverage"))] == [0, 2]


def erf_warnings(records: list[warnings.WarningMessage]) -> list[str]:
    """The erf-monitor warnings among ``records``."""
    ours = (em.ERFProbeWarning, em.ERFCoverageWarning)
    return [
        f"{w.category.__name__}: {w.message}"
        for w in records
        if issubclass(w.category, ours) or str(w.message).startswith("erf-monitor")
    ]


@pytest.mark.parametrize("build", [vit, convnext], ids=["vit", "convnext"])
def test_defaults_are_quiet_and_log_maps(build: Any, tmp_path: Path) -> None:
    """``layers="auto"`` on Hugging Face models: traced exactly (no numeric-fallback warning
    about ``torch.fx``), no other erf-monitor warning, and every picked layer's maps logged."""
    cb = em.ERFTrainerCallback(every_n_steps=2, num_samples=3)
    trainer = Trainer(
        model=build(), args=args(tmp_path, report_to=["tensorboard"]), train_dataset=Images(),
        callbacks=[cb],
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.train()
    found = erf_warnings(rec)
    assert not found, found  # (ConvNeXt's first stage at init is probed in float64: exact)
    layers = list(cb.history)
    assert layers
    runs = sorted(p.parent for p in (tmp_path / "runs").rglob("events.out.tfevents.*"))
    ea = scalars(runs[-1])
    for layer in layers:
        assert cb.latest is not None and cb.latest[layer].trf is not None
        assert cb.latest[layer].trf.method == "fx", layer
        assert [i.step for i in ea.Images(tb_tag(f"erf/{layer}/heatmap"))] == [0, 2, 4, 5], layer
        assert [e.step for e in ea.Scalars(tb_tag(f"erf/{layer}/coverage"))] == [0, 2, 4, 5], layer


def swin() -> Any:
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(
        image_size=32, patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=4,
        num_labels=4,
    )  # fmt: skip
    return transformers.SwinForImageClassification(cfg)


NAMED = {
    "vit": ["vit.embeddings.patch_embeddings.projection", "vit.layers.0"],
    "convnext": [*CONVNEXT_LAYERS, "convnext.encoder.stages.1"],
    "swin": ["swin.embeddings.patch_embeddings.projection", "swin.encoder.layers.0.blocks.1[0]"],
}


@pytest.mark.parametrize("name", ["vit", "convnext", "swin"])
def test_hugging_face_models_are_traced_exactly(name: str) -> None:
    """No numeric fallback: the tracer follows Hugging Face's forwards (size checks, output
    dataclasses, the attention interface, Swin's windows), for auto and named layers."""
    model = {"vit": vit, "convnext": convnext, "swin": swin}[name]().eval()
    x = torch.randn(2, 3, 32, 32)
    pick = pick_layers(model, x, pixels)
    for layers, layouts in ((pick.names, pick.layouts), (NAMED[name], None)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", em.ERFProbeWarning)
            trfs = em.theoretical_rf(
                model, (3, 32, 32), layers, forward_fn=pixels, token_layout=layouts
            )
        assert [t.method for t in trfs.values()] == ["fx"] * len(layers), layers


def pixels(m: Any, x: torch.Tensor) -> Any:
    return m(pixel_values=x)


class StopInOnLog(TrainerCallback):  # type: ignore[misc]
    """Stops training from ``on_log`` (after the step's ``on_step_end``), like early stopping."""

    def on_log(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == 3:
            control.should_training_stop = True


def test_final_probe_after_the_trainer_closed_its_writer(tmp_path: Path) -> None:
    # Stopped outside the step loop: the final probe runs in on_train_end, after the
    # Trainer's TensorBoardCallback closed its writer; it lands in the monitor's own run.
    cb = em.ERFTrainerCallback(CONVNEXT_LAYERS[:1], every_n_steps=2, num_samples=2,
                               min_coverage=None)  # fmt: skip
    trainer = train(
        convnext(), args(tmp_path, report_to=["tensorboard"], max_steps=10), [StopInOnLog(), cb]
    )
    assert trainer.state.global_step == 3
    files = list((tmp_path / "runs").rglob("erf/events.out.tfevents.*"))
    assert len(files) == 1  # ours, beside the Trainer's closed run: the final probe is in it
    ea = scalars(files[0].parent)
    assert [e.step for e in ea.Scalars(tb_tag(f"erf/{CONVNEXT_LAYERS[0]}/coverage"))] == [0, 2, 3]
    assert [i.step for i in ea.Images(tb_tag(f"erf/{CONVNEXT_LAYERS[0]}/heatmap"))] == [0, 2, 3]


def test_training_is_bit_for_bit_identical_with_the_callback(tmp_path: Path) -> None:
    # A ViT with dropout, shuffled batches: any RNG draw or dataloader step taken by the
    # monitor would change the weights.
    plain = train(vit(), args(tmp_path / "a"), [])
    cb = em.ERFTrainerCallback(VIT_LAYERS, every_n_steps=1, num_samples=2, min_coverage=None)
    watched = train(vit(), args(tmp_path / "b"), [cb])
    assert sorted(cb.history[VIT_LAYERS[0]]) == [0, 1, 2, 3, 4, 5]
    a, b = plain.model.state_dict(), watched.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, watched)]
    assert losses[0] == losses[1]
    # The ViT's forward takes pixel_values= and returns a ModelOutput: probed as such.
    assert cb._engine.forward_fn is not None
    assert cb.history[VIT_LAYERS[0]][0]["trf_size"] == 8.0  # the 8x8 patch embedding


def test_no_reporting_integration_falls_back_to_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cb = em.ERFTrainerCallback(CONVNEXT_LAYERS[:1], every_n_steps=3, num_samples=2)
    train(convnext(), args(tmp_path, report_to="none"), [cb])
    out = capsys.readouterr().out  # the end-of-training summary, as in the other front-ends
    assert "ERF over training (steps 0 → 5, 3 probes)" in out and CONVNEXT_LAYERS[0] in out
    csv = (tmp_path / "erf" / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("step")
    assert sorted({int(line.split(",")[0]) for line in csv[1:]}) == [0, 3, 5]
    assert len(list((tmp_path / "erf" / "heatmaps").rglob("*.png"))) == 3


def test_stop_sets_should_training_stop(tmp_path: Path) -> None:
    cb = em.ERFTrainerCallback(
        CONVNEXT_LAYERS[:1], every_n_steps=1, num_samples=2, min_coverage=0.99,
        on_insufficient="stop",
    )  # fmt: skip
    with pytest.warns(em.ERFCoverageWarning):
        trainer = train(convnext(), args(tmp_path, max_steps=20), [cb])
    assert trainer.state.global_step == 1  # the alert at train begin: stop after one step
    assert cb.alerts == {CONVNEXT_LAYERS[0]: 0}


def test_raise_propagates_out_of_train(tmp_path: Path) -> None:
    cb = em.ERFTrainerCallback(
        CONVNEXT_LAYERS[:1], num_samples=2, min_coverage=0.99, on_insufficient="raise"
    )
    with pytest.raises(em.ERFCoverageWarning, match="covers only"):
        train(convnext(), args(tmp_path), [cb])


def test_unknown_layer_raises_before_training(tmp_path: Path) -> None:
    cb = em.ERFTrainerCallback(["convnext.encoder.stage9"], num_samples=2)
    with pytest.raises(ValueError, match=r"convnext\.encoder\.stages"):
        train(convnext(), args(tmp_path), [cb])


def test_val_probe_inputs_is_refused() -> None:
    with pytest.raises(ValueError, match="evaluation loader"):
        em.ERFTrainerCallback(probe_inputs="val")


def test_resume_from_a_moved_checkpoint_continues_the_curves(tmp_path: Path) -> None:
    """The state travels in the checkpoint's trainer_state.json: resuming from a checkpoint
    moved out of output_dir restores history and probe batch, and the curves are those of
    the uninterrupted run (the checkpoint's step is not probed again)."""
    import json
    import shutil

    kw = {"every_n_steps": 2, "num_samples": 3, "min_coverage": None}
    full = em.ERFTrainerCallback(CONVNEXT_LAYERS, **kw)  # type: ignore[arg-type]
    train(convnext(), args(tmp_path / "full", max_steps=6), [full])
    first = em.ERFTrainerCallback(CONVNEXT_LAYERS, **kw)  # type: ignore[arg-type]
    out = tmp_path / "resumed"
    train(convnext(), args(out, max_steps=6, save_strategy="steps", save_steps=3), [first])
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.move(str(out / "checkpoint-3"), str(moved))  # users move checkpoints
    shutil.rmtree(out)
    saved = json.loads((moved / "trainer_state.json").read_text())["stateful_callbacks"]
    assert sorted(saved["erf_monitor"]["history"][CONVNEXT_LAYERS[0]]) == ["0", "2"]
    layer = CONVNEXT_LAYERS[1]
    for restore_flag in (False, True):  # True: transformers' own restore of callbacks
        resumed = em.ERFTrainerCallback(CONVNEXT_LAYERS, **kw)  # type: ignore[arg-type]
        a = args(out, max_steps=6, restore_callback_states_from_checkpoint=restore_flag)
        trainer = train(convnext(), a, [resumed], resume_from_checkpoint=str(moved))
        assert resumed in trainer.callback_handler.callbacks  # never replaced by a copy
        assert resumed.probe_batch is not None and full.probe_batch is not None
        assert torch.equal(resumed.probe_batch, full.probe_batch)  # the same images
        assert sorted(resumed.history[layer]) == [0, 2, 4, 6]  # restored, then continued
        for step in (0, 2, 4, 6):  # HF resumes exactly on CPU: the numbers of the full run
            assert resumed.history[layer][step] == pytest.approx(full.history[layer][step])
    # A new train() with the same callback (no resume) is a run of its own.
    train(convnext(), args(tmp_path / "again", max_steps=3), [resumed])
    assert sorted(resumed.history[layer]) == [0, 2, 3]


def test_resume_with_unreadable_monitor_state_finishes_training(tmp_path: Path) -> None:
    """Monitor state a newer library wrote, or damaged state, in trainer_state.json: one
    warning that says what was lost, the monitor starts afresh, and training resumes."""
    import json

    kw = {"every_n_steps": 2, "num_samples": 2, "min_coverage": None}
    out = tmp_path / "run"
    first = em.ERFTrainerCallback(CONVNEXT_LAYERS[:1], **kw)  # type: ignore[arg-type]
    train(convnext(), args(out, max_steps=3, save_strategy="steps", save_steps=3), [first])
    state_file = out / "checkpoint-3" / "trainer_state.json"
    saved = json.loads(state_file.read_text())
    damages = {
        "newer erf-monitor: state version 2": {"version": 2},
        "error: Error -3 while decompressing": {"probe_batch": {"shape": [2], "float32": "AAAA"}},
        "invalid literal for int()": {"history": {CONVNEXT_LAYERS[0]: {"two": {}}}},
    }
    for reason, damage in damages.items():
        broken = json.loads(json.dumps(saved))
        broken["stateful_callbacks"]["erf_monitor"].update(damage)
        state_file.write_text(json.dumps(broken))
        resumed = em.ERFTrainerCallback(CONVNEXT_LAYERS[:1], **kw)  # type: ignore[arg-type]
        with pytest.warns(em.ERFProbeWarning) as rec:
            trainer = train(convnext(), args(out, max_steps=5), [resumed],
                            resume_from_checkpoint=str(state_file.parent))  # fmt: skip
        assert trainer.state.global_step == 5
        (msg,) = [str(w.message) for w in rec if issubclass(w.category, em.ERFProbeWarning)]
        assert reason in msg and "ERF history and alert state are lost" in msg, msg
        assert sorted(resumed.history[CONVNEXT_LAYERS[0]]) == [3, 4, 5]  # afresh from step 3


@pytest.mark.slow
def test_wandb_offline_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "erf-tests")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cb = em.ERFTrainerCallback(CONVNEXT_LAYERS[:1], every_n_steps=2, num_samples=2,
                               min_coverage=None)  # fmt: skip
    try:
        train(convnext(), args(tmp_path / "out", report_to=["wandb"], max_steps=4), [cb])
        run_dir = Path(wandb.run.dir)
    finally:
        wandb.finish()
    images = sorted((run_dir / "media" / "images").rglob("*.png"))
    assert len(images) == 3  # steps 0, 2, 4
    from PIL import Image

    assert np.asarray(Image.open(images[0])).shape[2] in (3, 4)
    assert (run_dir / "erf_maps").is_dir()
    # One history row per probe (scalars and heatmap together), on the Trainer's x-axis.
    rows = [h for h in wandb_history(run_dir.parent) if "erf/step" in h]
    assert [(h["erf/step"], h["train/global_step"]) for h in rows] == [(0, 0), (2, 2), (4, 4)]
    assert all(f"erf/{CONVNEXT_LAYERS[0]}/heatmap/_type" in h for h in rows)


@pytest.mark.slow
def test_mlflow_reuses_the_trainers_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "erf-hf")
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    client = mlflow.MlflowClient(tracking_uri=uri)  # artifacts under tmp_path, not ./mlruns
    client.create_experiment("erf-hf", artifact_location=str(tmp_path / "artifacts"))
    cb = em.ERFTrainerCallback(CONVNEXT_LAYERS[:1], every_n_steps=2, num_samples=2,
                               min_coverage=None)  # fmt: skip
    train(convnext(), args(tmp_path / "out", report_to=["mlflow"], max_steps=4), [cb])
    (run,) = client.search_runs([client.get_experiment_by_name("erf-hf").experiment_id])
    layer = CONVNEXT_LAYERS[0]
    history = client.get_metric_history(run.info.run_id, f"erf/{layer}/coverage")
    assert [m.step for m in history] == [0, 2, 4]
    assert [m.value for m in history] == pytest.approx(
        [cb.history[layer][s]["coverage"] for s in (0, 2, 4)]
    )
    assert "train_loss" in run.data.metrics or "loss" in run.data.metrics  # the Trainer's run
    artifacts = _all_artifacts(client, run.info.run_id)
    assert any(a.endswith(".npz") for a in artifacts)
    assert any(a.endswith(".png") for a in artifacts)
    mlflow.end_run()


def _all_artifacts(client: Any, run_id: str, path: str | None = None) -> list[str]:
    out: list[str] = []
    for info in client.list_artifacts(run_id, path):
        out += _all_artifacts(client, run_id, info.path) if info.is_dir else [info.path]
    return out


def test_lazy_import() -> None:
    import subprocess
    import sys

    code = (
        "import sys, erf_monitor as em\n"
        "import erf_monitor.integrations.accelerate\n"
        "before = [m for m in ('transformers', 'accelerate') if m in sys.modules]\n"
        "em.ERFTrainerCallback\n"
        "print(before, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] True", out.stdout + out.stderr


def test_without_transformers_the_message_says_what_to_install() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import erf_monitor as em\n"
        "try:\n"
        "    em.ERFTrainerCallback()\n"
        "except ModuleNotFoundError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install erf-monitor[transformers]" in out.stdout, out.stdout + out.stderr
