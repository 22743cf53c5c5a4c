"""``em.replay`` and ``erf-monitor replay``: a finished run's checkpoints probed as a live
monitor would have probed them.

Checkpoints come from the real thing (Lightning ``Trainer.fit`` with ``ModelCheckpoint``,
Hugging Face ``Trainer`` writing ``checkpoint-N/``, plain state dicts named by step); every
number is checked against ``compute_erf`` on a fresh model loaded by the test itself with
the same weights and inputs, and the run folder is read back by ``report`` and TensorBoard's
own reader.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import erf_monitor as em
from erf_monitor.cli.main import main
from erf_monitor.cli.replay import ReplayError, find_checkpoints


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(8, 1, 3, padding=1),
    )  # fmt: skip


def rows(folder: Path) -> dict[tuple[int, str], float]:
    with (folder / "metrics.csv").open(newline="") as f:
        return {(int(r["step"]), r["key"]): float(r["value"]) for r in csv.DictReader(f)}


def check_against_compute_erf(
    folder: Path,
    fresh: nn.Module,
    weights: Mapping[int, Mapping[str, torch.Tensor]],
    x: torch.Tensor,
    layers: list[str],
) -> None:
    """Every step's raw maps and coverage equal compute_erf on ``fresh`` with those weights."""
    logged = rows(folder)
    assert sorted({s for s, _ in logged}) == sorted(weights)
    seen = []
    for step, state in weights.items():
        fresh.load_state_dict(state)
        expected = em.compute_erf(fresh, x, layers)
        with np.load(folder / "erf_maps" / f"step_{step}.npz", allow_pickle=False) as maps:
            for layer in layers:
                np.testing.assert_array_equal(maps[layer], expected[layer].heatmap.numpy())
                assert logged[(step, f"erf/{layer}/coverage")] == expected[layer].coverage
            seen.append(maps[layers[-1]])
    assert not np.array_equal(seen[0], seen[-1])  # the checkpoints differ: so do their maps


@pytest.mark.slow
def test_lightning_checkpoints(tmp_path: Path) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_net()  # keys saved as "net.<name>"

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x).mean((1, 2, 3)), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.5)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 3, 16, 16, generator=g), torch.randn(32, generator=g))
    ckpts = tmp_path / "ckpts"
    trainer = L.Trainer(
        max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu",
        callbacks=[ModelCheckpoint(dirpath=ckpts, every_n_train_steps=2, save_top_k=-1,
                                   save_last=True)],
    )  # fmt: skip
    trainer.fit(Lit(), DataLoader(data, batch_size=4))
    assert (ckpts / "last.ckpt").is_file()  # step 6 twice: probed once, with a warning

    x = torch.randn(3, 3, 24, 24, generator=g)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="last.ckpt.*probed once"):
        run = em.replay(small_net(), tmp_path, ["2", "4"], inputs=x, out=out, min_coverage=None)
    assert [c.step for c in run.checkpoints] == run.probed == [2, 4, 6]
    assert {c.kind for c in run.checkpoints} == {"lightning"}
    weights = {}
    for step in (2, 4, 6):
        saved = torch.load(ckpts / f"epoch=0-step={step}.ckpt", weights_only=True)
        assert saved["global_step"] == step
        weights[step] = {k.removeprefix("net."): v for k, v in saved["state_dict"].items()}
    check_against_compute_erf(out, small_net(), weights, x, ["2", "4"])
    assert sorted(run.history["4"]) == [2, 4, 6]
    assert (out / "heatmaps" / "4" / "step_6.png").is_file()


def test_huggingface_checkpoints(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    from test_transformers import CONVNEXT_LAYERS, Images, convnext  # the same tiny HF setup

    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=6, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to="none", save_strategy="steps", save_steps=2,
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=convnext(), args=args, train_dataset=Images(n=24))
    trainer.train()
    trainer.save_model()  # the final weights in output_dir too, at step 6 like checkpoint-6
    trainer.save_state()

    layers = CONVNEXT_LAYERS
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"'.*hf' holds step 6 like .*checkpoint-6.*probed once"):
        run = em.replay(convnext(), tmp_path / "hf", layers, inputs=x, out=out, summary=False)
    assert [(c.step, c.kind, c.path.name) for c in run.checkpoints] == [
        (s, "huggingface", f"checkpoint-{s}") for s in (2, 4, 6)
    ]  # optimizer.pt, rng_state.pth... inside them are not checkpoints of their own
    weights = {s: load_file(tmp_path / "hf" / f"checkpoint-{s}" / "model.safetensors")
               for s in (2, 4, 6)}  # fmt: skip
    check_against_compute_erf(out, convnext(), weights, x, layers)


@pytest.fixture
def resnet_run(tmp_path: Path) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    """resnet18 state dicts saved as step_100.pt, step_200.pt, step_300.pt, and x.npy."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    g = torch.Generator().manual_seed(5)
    weights = {}
    for step in (100, 200, 300):
        with torch.no_grad():  # "training": the weights move between checkpoints
            for p in model.parameters():
                p.add_(0.3 * p.std().nan_to_num() * torch.randn(p.shape, generator=g))
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(weights[step], tmp_path / f"step_{step}.pt")
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return tmp_path, weights


def test_cli_state_dicts_report_and_tensorboard(
    resnet_run: tuple[Path, dict[int, dict[str, torch.Tensor]]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import torchvision
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from erf_monitor.cli.report import build_report
    from erf_monitor.sinks._tensorboard import tb_tag

    folder, weights = resnet_run
    monkeypatch.chdir(folder)
    argv = ["replay", "torchvision:resnet18", "step_300.pt", "step_100.pt", "step_200.pt",
            "--layers", "layer2", "--input", "x.npy", "--out", "out", "--logger", "tensorboard",
            "--min-coverage", "0.99", "--quiet"]  # fmt: skip
    with pytest.warns(em.ERFCoverageWarning, match=r"at step 300 .* .layer2.* end of training"):
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "steps 100 → 300, 3 probes" in printed  # the monitor's summary table
    out = folder / "out"
    assert [k for k in rows(out) if k[1] == "erf/layer2/coverage"] == [
        (100, "erf/layer2/coverage"), (200, "erf/layer2/coverage"), (300, "erf/layer2/coverage")
    ]  # fmt: skip
    x = torch.from_numpy(np.load(folder / "x.npy", allow_pickle=False))
    check_against_compute_erf(out, torchvision.models.resnet18(), weights, x, ["layer2"])
    alerts = (out / "alerts.jsonl").read_text().splitlines()
    # The monitor's policy: a TRF that allows the bound leaves the ERF time to grow (warm-up
    # of 1000 steps), so the one alert comes at the end of the run, at its last checkpoint.
    assert len(alerts) == 1 and '"step": 300' in alerts[0]

    # TensorBoard's own reader: the same coverage at the same steps.
    (events,) = (out / "erf").glob("events.out.tfevents.*")
    ea = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tag = tb_tag("erf/layer2/coverage")  # the sink's own tag scheme
    assert tag in ea.Tags()["scalars"]
    assert [e.step for e in ea.Scalars(tag)] == [100, 200, 300]
    assert [e.value for e in ea.Scalars(tag)] == pytest.approx(
        [rows(out)[(s, "erf/layer2/coverage")] for s in (100, 200, 300)]
    )
    # The report reads both (the folder's files and the event file) as runs over 3 steps.
    _, runs = build_report(out, dedupe=False)
    assert {r.source for r in runs} == {"files", "tensorboard"}
    for r in runs:
        assert [s for s, _ in r.metrics["layer2"]["coverage"]] == [100, 200, 300]


def test_skip_existing_resumes(
    resnet_run: tuple[Path, dict[int, dict[str, torch.Tensor]]], tmp_path: Path
) -> None:
    import torchvision

    folder, _ = resnet_run
    x = torch.from_numpy(np.load(folder / "x.npy", allow_pickle=False))
    out = tmp_path / "out"
    kw = {"inputs": x, "out": out, "min_coverage": 0.99, "summary": False}
    first = [folder / "step_100.pt", folder / "step_200.pt"]
    with pytest.warns(em.ERFCoverageWarning):
        em.replay(torchvision.models.resnet18(), first, ["layer2"], **kw)  # type: ignore[arg-type]
    every = [folder / f"step_{s}.pt" for s in (100, 200, 300)]
    with pytest.raises(ReplayError, match="holds a run already"):
        em.replay(torchvision.models.resnet18(), every, ["layer2"], **kw)  # type: ignore[arg-type]
    run = em.replay(torchvision.models.resnet18(), every, ["layer2"], skip_existing=True, **kw)  # type: ignore[arg-type]
    assert run.probed == [300]
    # The history was resumed; the run's end moved from step 200 to 300, and with it the
    # policy's end-of-training alert.
    assert sorted(run.history["layer2"]) == [100, 200, 300] and run.alerts == {"layer2": 300}
    keys = [(s, k) for s, k in rows(out) if k == "erf/layer2/coverage"]
    assert [s for s, _ in keys] == [100, 200, 300]
    with pytest.raises(ReplayError, match="other settings"):
        em.replay(torchvision.models.resnet18(), every, ["layer1"], skip_existing=True, **kw)  # type: ignore[arg-type]


class NotWeights:
    pass


def test_checkpoints_are_data_and_named_by_step(tmp_path: Path) -> None:
    net = small_net()
    torch.save(net.state_dict(), tmp_path / "final.pt")
    with pytest.raises(ReplayError, match=r"cannot tell the training step of .*final\.pt"):
        find_checkpoints([tmp_path / "final.pt"])
    torch.save({"global_step": 7, "model": net.state_dict()}, tmp_path / "final.pt")
    assert [c.step for c in find_checkpoints([tmp_path / "final.pt"])] == [7]
    torch.save({"w": torch.zeros(1), "obj": NotWeights()}, tmp_path / "step_3.pt")
    with pytest.raises(ReplayError, match=r"refusing .*step_3\.pt.*a pickle that needs code"):
        find_checkpoints([tmp_path])  # code, not data: refused by weights_only loading
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReplayError, match="no checkpoint found"):
        find_checkpoints([tmp_path / "empty"])


MODEL_FILE = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=2, dilation=2))
"""


@pytest.mark.slow
def test_torchrun_shares_the_checkpoints(tmp_path: Path) -> None:
    """Two processes probe the checkpoints between them; rank 0 writes the run a single
    process writes (the same rows, values and alert)."""
    import os
    import subprocess
    import sys

    from conftest import HANG_GUARD_S

    (tmp_path / "model.py").write_text(MODEL_FILE)
    g = torch.Generator().manual_seed(2)
    namespace: dict[str, Any] = {}
    exec(MODEL_FILE, namespace)  # the test's own copy of the architecture
    net = namespace["make"]()
    for step in (10, 20, 30):  # 3 checkpoints: 2 on rank 0, 1 on rank 1
        sd = {k: torch.randn(v.shape, generator=g) for k, v in net.state_dict().items()}
        torch.save(sd, tmp_path / f"step_{step}.pt")
    common = ["step_30.pt", "step_10.pt", "step_20.pt", "--layers", "2", "--input-size", "20",
              "--samples", "3", "--min-coverage", "0.9", "--quiet"]  # fmt: skip
    src = str(Path(em.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "erf_monitor.cli", "replay", "model.py:make", *common, "--out", "two"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("3 probes") == 1  # rank 0's summary only
    proc = subprocess.run(
        [sys.executable, "-m", "erf_monitor.cli", "replay", "model.py:make", *common,
         "--out", "one"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = rows(tmp_path / "two"), rows(tmp_path / "one")
    assert sorted({s for s, _ in two}) == [10, 20, 30]
    probe_time = [k for k in one if k[1].endswith("probe_time_s")]
    assert {k: v for k, v in two.items() if k not in probe_time} == {
        k: v for k, v in one.items() if k not in probe_time
    }
    for folder in ("one", "two"):
        alerts = (tmp_path / folder / "alerts.jsonl").read_text().splitlines()
        assert len(alerts) == 1 and '"step": 10' in alerts[0]  # its TRF is too small: at once


def tiny_run(folder: Path) -> list[str]:
    """model.py:make and three state dicts of it; the CLI arguments that replay them."""
    (folder / "model.py").write_text(MODEL_FILE)
    namespace: dict[str, Any] = {}
    exec(MODEL_FILE, namespace)  # the test's own copy of the architecture
    net = namespace["make"]()
    g = torch.Generator().manual_seed(2)
    for step in (10, 20, 30):
        sd = {k: torch.randn(v.shape, generator=g) for k, v in net.state_dict().items()}
        torch.save(sd, folder / f"step_{step}.pt")
    return ["replay", "model.py:make", "step_10.pt", "step_20.pt", "step_30.pt", "--layers",
            "2", "--input-size", "20", "--samples", "3", "--quiet"]  # fmt: skip


@pytest.mark.slow
def test_cli_wandb_and_mlflow_loggers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = tiny_run(tmp_path)
    assert main([*argv, "--logger", "wandb", "--out", "wb"]) == 0  # the run is finished
    (run_dir,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    pngs = sorted((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert len(pngs) == 3  # one heatmap per checkpoint

    assert main([*argv, "--logger", "mlflow", "--out", "ml"]) == 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("erf-monitor").experiment_id])
    (key,) = [k for k in run.data.metrics if "2" in k and k.endswith("/coverage")]
    history = client.get_metric_history(run.info.run_id, key)
    assert sorted(m.step for m in history) == [10, 20, 30]
    assert run.info.status == "FINISHED"


def test_cli_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    argv = tiny_run(tmp_path)
    assert main([*argv, "--pretrained"]) == 2
    assert "--pretrained is not used" in capsys.readouterr().err
    assert main([*argv[:2], "nothing.pt", *argv[5:]]) == 2
    assert "'nothing.pt' does not exist" in capsys.readouterr().err
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "step_40.pt")
    assert main([*argv[:2], "step_40.pt", *argv[5:]]) == 2
    err = capsys.readouterr().err
    assert "step_40.pt" in err and "does not match the model" in err and "Traceback" not in err
