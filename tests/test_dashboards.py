"""What users see first in their dashboards: growth first in TensorBoard (read back with its own
reader), one alert and a monotonic step in W&B (an offline run's record log)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import erf_monitor as em
from wandb_records import wandb_alerts, wandb_history

pytest.importorskip("lightning")
import lightning.pytorch as pl
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def _seq() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
    )


def test_tensorboard_cards_start_with_every_layers_coverage(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    net = _seq()
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    writer = SummaryWriter(str(tmp_path))
    w = em.watch(net, layers=["0", "2"], probe_inputs=x, logger=writer, min_coverage=None)
    w.probe()
    w.step()
    w.close()
    writer.close()
    ea = EventAccumulator(str(tmp_path / "erf"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tags = sorted(ea.Tags()["scalars"])  # TensorBoard's order of a group's cards
    assert tags[:6] == [
        "erf/1_coverage/layer_0",
        "erf/1_coverage/layer_2",
        "erf/2_erf_size/layer_0",
        "erf/2_erf_size/layer_2",
        "erf/3_erf_trf_ratio/layer_0",
        "erf/3_erf_trf_ratio/layer_2",
    ]
    assert all(not t.startswith(("erf/0/", "erf/2/")) for t in tags)  # no bare indices
    # first of all cards: the growth chart, every probe of every layer, unsmoothed
    assert sorted(ea.Tags()["images"]) == [
        "erf/0_growth", "erf/heatmap/layer_0", "erf/heatmap/layer_2"
    ]  # fmt: skip
    assert [i.step for i in ea.Images("erf/0_growth")] == [0, 1]
    values = [e.value for e in ea.Scalars("erf/1_coverage/layer_2")]
    assert values == pytest.approx([w.history["2"][s]["coverage"] for s in (0, 1)])


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _seq()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self.net(batch[0]), torch.zeros(1))
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_wandb_one_alert_at_warn_and_a_monotonic_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="erf-test")
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    # net.2's 5x5 TRF cannot cover half of the 16x16 input: alerted at the first probe
    cb = em.ERFMonitor(layers=["net.2"], every_n_steps=2, num_samples=2, min_coverage=0.5)
    trainer = pl.Trainer(
        max_steps=6, callbacks=[cb], logger=logger, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the alert's warning; Lightning's notes
            trainer.fit(_Module(), DataLoader(TensorDataset(x), batch_size=1))
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()
    assert cb.alerts == {"net.2": 0}
    alerts = wandb_alerts(run_dir)
    assert len(alerts) == 1 and alerts[0][0] == "erf_coverage/net.2" and alerts[0][2] == "WARN"
    history = wandb_history(run_dir)
    assert not any(k.startswith("alerts/") for h in history for k in h)  # not also a table
    steps = [h["trainer/global_step"] for h in history if "trainer/global_step" in h]
    assert len(steps) >= 6 and steps == sorted(steps), steps
    assert [h["erf/step"] for h in history if "erf/step" in h] == [0, 2, 4, 6]


def test_report_shows_the_trf_of_tensorboard_and_csv_runs(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from erf_monitor.cli.report import build_report

    loggers = [TensorBoardLogger(str(tmp_path / "tb")), CSVLogger(str(tmp_path / "csv"))]
    cb = em.ERFMonitor(layers=["net.0", "net.2"], every_n_steps=2, num_samples=2, summary=False)
    trainer = pl.Trainer(
        max_steps=2, callbacks=[cb], logger=loggers, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Module(), DataLoader(TensorDataset(x), batch_size=2))
    page, runs = build_report(tmp_path, tmp_path / "report.html", dedupe=False)
    assert sorted(r.source for r in runs) == ["files", "tensorboard"]
    for run in runs:
        for layer, trf in (("net.0", 3.0), ("net.2", 5.0)):
            assert cb.history[layer][2]["trf_size_clipped"] == trf
            assert run.metrics[layer]["trf_size_clipped"] == [(0, trf), (2, trf)], run.source
    html = page.read_text()
    assert html.count("<td>3</td>") == 2 and html.count("<td>5</td>") == 2  # both runs
