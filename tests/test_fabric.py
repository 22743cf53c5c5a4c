"""``watch`` on a Lightning Fabric model and optimizer, logging through ``fabric.loggers``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import erf_monitor as em

fabric_mod = pytest.importorskip("lightning.fabric")
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from erf_monitor.sinks._tensorboard import tb_tag  # noqa: E402

LAYERS = ["0", "3"]


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # 0 1 2
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Dropout(0.2),  # 3 4 5
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def run(out: Path, watch: bool) -> tuple[dict[str, torch.Tensor], em.Watcher | None]:
    """The recipe of docs/guides/fabric.md."""
    fabric = fabric_mod.Fabric(
        accelerator="cpu", devices=1,
        loggers=[TensorBoardLogger(str(out), name="tb"), CSVLogger(str(out), name="csv")],
    )  # fmt: skip
    fabric.seed_everything(0)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 4, (24,), generator=g)
    )
    loader = fabric.setup_dataloaders(DataLoader(data, batch_size=4, shuffle=True))
    watcher = None
    if watch:  # the Fabric-wrapped model and optimizer, as they are
        watcher = em.watch(
            model, LAYERS, optimizer=optimizer, logger=fabric.loggers, every_n_steps=2,
            num_samples=4, min_coverage=None,
        )  # fmt: skip
    for step, (x, y) in enumerate(loader):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        fabric.log("train/loss", loss.item(), step=step + 1)
    if watcher is not None:
        watcher.close()
    for logger in fabric.loggers:
        logger.finalize("success")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, watcher


def test_fabric_loggers_get_the_probes(tmp_path: Path) -> None:
    _, watcher = run(tmp_path, watch=True)
    assert watcher is not None and watcher.global_step == 6
    runs = sorted(p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*"))
    # Fabric's run (the loss) and the monitor's own run in its erf/ folder.
    assert len(runs) == 2 and runs[1] == runs[0] / "erf"
    fabric_run = EventAccumulator(str(runs[0]), size_guidance={"scalars": 0})
    fabric_run.Reload()
    assert "train/loss" in fabric_run.Tags()["scalars"]
    ea = EventAccumulator(str(runs[1]), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    for layer in LAYERS:
        assert [e.step for e in ea.Scalars(tb_tag(f"erf/{layer}/coverage"))] == [0, 2, 4, 6]
        assert [i.step for i in ea.Images(tb_tag(f"erf/{layer}/heatmap"))] == [0, 2, 4, 6]
    # The CSVLogger: scalars in its own metrics.csv next to the loss (through log_metrics),
    # heatmaps and raw maps in erf/ beside it.
    import csv

    (table,) = (tmp_path / "csv").rglob("metrics.csv")
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r.get(f"erf/{LAYERS[0]}/coverage")] == [0, 2, 4, 6]
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert len(list((table.parent / "erf" / "heatmaps").rglob("step_*.png"))) == 4 * len(LAYERS)
    assert len(list((table.parent / "erf" / "erf_maps").glob("step_*.npz"))) == 4


def test_training_is_bit_for_bit_identical_with_the_watcher(tmp_path: Path) -> None:
    plain, _ = run(tmp_path / "a", watch=False)
    watched, _ = run(tmp_path / "b", watch=True)
    for k in plain:
        assert torch.equal(plain[k], watched[k]), k


def test_layer_names_are_those_of_the_model_inside(tmp_path: Path) -> None:
    fabric = fabric_mod.Fabric(accelerator="cpu", devices=1)
    model = fabric.setup(make_model())
    w: Any = em.watch(model, ["3"], probe_inputs=torch.randn(2, 3, 16, 16), min_coverage=None)
    assert w.model is model.module
    results = w.probe()
    assert results is not None and results["3"].trf.size == (5.0, 5.0)  # 3 + (3 - 1) * 1
