"""``watch`` in Accelerate loops, logging through ``accelerator.trackers`` (real runs)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import erf_monitor as em

accelerate = pytest.importorskip("accelerate")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from erf_monitor.integrations.accelerate import AccelerateSink  # noqa: E402
from erf_monitor.sinks import as_sink, log_results  # noqa: E402
from erf_monitor.sinks._tensorboard import tb_tag  # noqa: E402

LAYERS = ["1", "4"]


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.2),  # 0 1 2
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),  # 3 4
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
    )
    return DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2))


def run(project_dir: Path, watch: bool, **watch_kw: Any) -> tuple[Any, em.Watcher | None, Any]:
    """The recipe of docs/guides/accelerate.md, on 8 batches with 2-step accumulation."""
    acc = accelerate.Accelerator(
        cpu=True, log_with="tensorboard", project_dir=str(project_dir),
        gradient_accumulation_steps=2,
    )  # fmt: skip
    acc.init_trackers("erf")
    torch.manual_seed(3)
    model, opt = make_model(), None
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, opt, data = acc.prepare(model, opt, loader())
    watcher = None
    if watch:
        watcher = em.watch(
            model, LAYERS, optimizer=opt, logger=acc, every_n_steps=2, num_samples=4,
            min_coverage=None, **watch_kw,
        )  # fmt: skip
    for i, (x, y) in enumerate(data):
        with acc.accumulate(model):
            loss = nn.functional.cross_entropy(model(x), y)
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
        acc.log({"train/loss": loss.item()}, step=i)
    if watcher is not None:
        watcher.close()
    state = {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}
    acc.end_training()
    return state, watcher, acc


def test_tensorboard_tracker_gets_scalars_and_images(tmp_path: Path) -> None:
    _, watcher, _ = run(tmp_path, watch=True)
    assert watcher is not None
    # 8 micro-batches, accumulation 2: 4 optimizer steps; probes at 0, 2 and 4.
    assert watcher.global_step == 4
    runs = sorted(p.parent for p in tmp_path.rglob("events.out.tfevents.*"))
    # The tracker's run (the loss) and the monitor's own run in its erf/ folder.
    assert len(runs) == 2 and runs[1] == runs[0] / "erf"
    tracker = EventAccumulator(str(runs[0]), size_guidance={"scalars": 0})
    tracker.Reload()
    assert "train/loss" in tracker.Tags()["scalars"]
    ea = EventAccumulator(str(runs[1]), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    for layer in LAYERS:
        coverage = ea.Scalars(tb_tag(f"erf/{layer}/coverage"))
        assert [e.step for e in coverage] == [0, 2, 4]
        assert [e.value for e in coverage] == pytest.approx(
            [watcher.history[layer][s]["coverage"] for s in (0, 2, 4)]
        )
        assert [i.step for i in ea.Images(tb_tag(f"erf/{layer}/heatmap"))] == [0, 2, 4]


def test_training_is_bit_for_bit_identical_with_the_watcher(tmp_path: Path) -> None:
    plain, _, _ = run(tmp_path / "a", watch=False)
    watched, _, _ = run(tmp_path / "b", watch=True)
    assert plain.keys() == watched.keys()
    for k in plain:
        assert torch.equal(plain[k], watched[k]), k


def test_as_sink_wraps_an_accelerator(tmp_path: Path) -> None:
    acc = accelerate.Accelerator(cpu=True)
    sink = as_sink(acc)
    assert isinstance(sink, AccelerateSink)
    sink.log_scalars({"erf/a/coverage": 0.5}, 1)  # no trackers: nothing to do, no error
    with pytest.raises(TypeError, match="needs an Accelerator"):
        AccelerateSink(object())


def _results() -> Any:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    return em.compute_erf(make_model(), x, LAYERS)


@pytest.mark.slow
def test_mlflow_tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    acc = accelerate.Accelerator(cpu=True, log_with="mlflow")
    artifacts = str(tmp_path / "artifacts")  # not ./mlruns
    acc.init_trackers("erf-acc", init_kwargs={"mlflow": {"logging_dir": artifacts}})
    results = _results()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log_results(AccelerateSink(acc), results, 7)
    run_id = acc.get_tracker("mlflow").active_run.info.run_id
    acc.end_training()
    client = mlflow.MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, f"erf/{LAYERS[1]}/coverage")
    assert [(m.step, m.value) for m in history] == [(7, pytest.approx(results[LAYERS[1]].coverage))]
    paths: list[str] = []
    todo: list[str | None] = [None]
    while todo:
        for info in client.list_artifacts(run_id, todo.pop()):
            (todo if info.is_dir else paths).append(info.path)  # type: ignore[arg-type]
    assert any(p.endswith(".png") for p in paths) and any(p.endswith(".npz") for p in paths)


@pytest.mark.slow
def test_wandb_tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    acc = accelerate.Accelerator(cpu=True, log_with="wandb")
    acc.init_trackers("erf-acc")
    try:
        log_results(AccelerateSink(acc), _results(), 3)
        run_dir = Path(acc.get_tracker("wandb", unwrap=True).dir)
    finally:
        acc.end_training()
        wandb.finish()
    pngs = sorted((run_dir / "media" / "images").rglob("*.png"))
    assert len(pngs) == len(LAYERS)
    from PIL import Image

    assert np.asarray(Image.open(pngs[0])).ndim == 3
