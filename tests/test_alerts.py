"""The coverage alert policy: no false alarm on a net that grows, at once for a TRF that is too
small, before the end for a net that never learns (real Lightning fits and a real watch())."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import erf_monitor as em
from erf_monitor.monitor.alerts import AlertPolicy, best_coverage, projected, replay_alerts
from erf_monitor.sinks import FileSink

pytest.importorskip("lightning")
import lightning.pytorch as pl

SIZE = 28  # 3x3 of 28x28 is 1.1% of the input; the wide branch's 27x27 square 93%
STEPS, EVERY = 100, 10


class GrowingNet(nn.Module):
    """``local(x) + gate * wide(x)``: a 3x3 ERF while the gate is shut, a 27x27 one when open.

    The gate is ``clamp(1000 * relu(p), 0, 1)``; the loss ``-p`` with SGD at ``lr=0.01`` moves
    ``p`` from -0.495 by 0.01 a step: shut up to step 49, open from step 50 on (lr=0: never).
    """

    def __init__(self, wide: bool = True) -> None:
        super().__init__()
        self.local = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        self.wide = nn.Conv2d(1, 1, SIZE - 1, padding=SIZE // 2 - 1, bias=False) if wide else None
        for conv in (self.local, self.wide):
            if conv is not None:
                nn.init.constant_(conv.weight, 1.0)
                conv.weight.requires_grad_(False)
        self.p = nn.Parameter(torch.tensor(-0.495))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        if self.wide is not None:
            y = y + torch.clamp(1000 * torch.relu(self.p), 0, 1) * self.wide(x)
        return y


class Module(pl.LightningModule):
    def __init__(self, wide: bool = True, lr: float = 0.01) -> None:
        super().__init__()
        self.net = GrowingNet(wide)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return -self.net.p + 0 * self(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loader() -> DataLoader:
    x = torch.randn(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x), batch_size=2)


def _fit(tmp_path: Path, module: Module, **options: Any) -> tuple[em.ERFMonitor, list[str]]:
    cb = em.ERFMonitor(
        layers=["net"], every_n_steps=EVERY, num_samples=2, summary=False,
        sinks=[FileSink(tmp_path / "erf")], **options,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_steps=STEPS, callbacks=[cb], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, _loader())
    alerts = [str(w.message) for w in record if issubclass(w.category, em.ERFCoverageWarning)]
    return cb, alerts


def _logged_alerts(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "erf" / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_growing_net_with_the_defaults_is_never_alerted(tmp_path: Path) -> None:
    cb, alerts = _fit(tmp_path, Module())
    coverage = {s: v["coverage"] for s, v in cb.history["net"].items()}
    assert sorted(coverage) == list(range(0, STEPS + 1, EVERY))
    assert all(coverage[s] < 0.02 for s in range(0, 50, EVERY))  # 3x3 px: 1.1%
    assert all(coverage[s] > 0.8 for s in range(50, STEPS + 1, EVERY))  # grown past 5%
    assert alerts == [] and cb.alerts == {} and _logged_alerts(tmp_path) == []


def test_trf_below_the_bound_is_alerted_at_the_first_probe(tmp_path: Path) -> None:
    cb, alerts = _fit(tmp_path, Module(wide=False))
    assert cb.alerts == {"net": 0} and len(alerts) == 1
    assert "only an architecture change helps" in alerts[0]
    assert [a["step"] for a in _logged_alerts(tmp_path)] == [0]


def test_net_that_never_learns_is_alerted_before_training_ends(tmp_path: Path) -> None:
    cb, alerts = _fit(tmp_path, Module(lr=0.0))
    assert cb.alerts == {"net": STEPS} and len(alerts) == 1  # inside fit(), after the last probe
    assert "at the end of training" in alerts[0] and "train longer" in alerts[0]
    assert [a["step"] for a in _logged_alerts(tmp_path)] == [STEPS]


def test_stalled_net_is_alerted_after_warmup_and_patience(tmp_path: Path) -> None:
    cb, alerts = _fit(tmp_path, Module(lr=0.0), alert_warmup=30, patience=3)
    assert cb.alerts == {"net": 30} and len(alerts) == 1  # steps 0..30 flat at 1.1%
    assert "for 4 consecutive probes and not growing towards it" in alerts[0]


def test_watcher_close_makes_the_final_decision() -> None:
    net = nn.Sequential(GrowingNet())
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    w = em.watch(net, layers=["0"], probe_inputs=x, every_n_steps=5, summary=False)
    w.probe()
    for _ in range(20):
        w.step()
    assert w.alerts == {}
    with pytest.warns(em.ERFCoverageWarning, match="at the end of training"):
        w.close()
    assert w.alerts == {"0": 20}


def test_raise_at_the_end_of_fit_after_logging_and_checkpointing(tmp_path: Path) -> None:
    """on_insufficient="raise" and an alert only decided at the end of training: fit raises
    it, once the alert is logged and every callback's on_train_end ran (the last checkpoint)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = em.ERFMonitor(
        layers=["net"], every_n_steps=EVERY, num_samples=2, summary=False,
        sinks=[FileSink(tmp_path / "erf")], on_insufficient="raise",
    )  # fmt: skip
    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1000)
    trainer = pl.Trainer(
        max_steps=STEPS, callbacks=[cb, last], logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with (
        pytest.raises(em.ERFCoverageWarning, match="at the end of training"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        trainer.fit(Module(lr=0.0), _loader())
    assert trainer.global_step == STEPS and cb.alerts == {"net": STEPS}
    assert [a["step"] for a in _logged_alerts(tmp_path)] == [STEPS]
    assert (tmp_path / "ckpt" / "last.ckpt").exists()  # saved by its on_train_end


def test_stop_at_the_end_of_fit_is_a_warning(tmp_path: Path) -> None:
    cb, alerts = _fit(tmp_path, Module(lr=0.0), on_insufficient="stop")
    assert cb.alerts == {"net": STEPS} and len(alerts) == 1


@pytest.mark.parametrize("action", ["raise", "stop"])
def test_watcher_close_acts_on_the_final_decision(tmp_path: Path, action: str) -> None:
    net = nn.Sequential(GrowingNet())
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    w = em.watch(
        net, layers=["0"], probe_inputs=x, every_n_steps=5, summary=False,
        logger=str(tmp_path / "erf"), on_insufficient=action,
    )  # fmt: skip
    w.probe()
    for _ in range(20):
        w.step()
    if action == "raise":
        error = pytest.raises(em.ERFCoverageWarning, match="at the end of training")
        with error, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w.close()
    else:
        with pytest.warns(em.ERFCoverageWarning, match="at the end of training"):
            w.close()
    assert w.alerts == {"0": 20} and not w.should_stop
    assert [a["step"] for a in _logged_alerts(tmp_path)] == [20]


# ----------------------------------------------------------------------------- the policy
def test_projection_is_the_least_squares_line() -> None:
    assert projected([(0, 0.01), (10, 0.02), (20, 0.03)], 20) == pytest.approx(0.05)
    assert projected([(0, 0.02), (10, 0.02)], 1000) == pytest.approx(0.02)


def test_policy_cases() -> None:
    policy = AlertPolicy(patience=3, warmup_steps=20)
    flat = [(0, 0.01), (10, 0.01), (20, 0.01), (30, 0.01)]
    assert policy.decide(flat[:2], 0.05) is None  # patience
    assert policy.decide(flat[:3], 0.05) == "stalled"
    assert AlertPolicy(patience=3, warmup_steps=40).decide(flat, 0.05) is None  # warm-up
    rising = [(0, 0.01), (10, 0.02), (20, 0.03)]  # 0.03 + 20 * 0.001 = 0.05: gets there
    assert policy.decide(rising, 0.05) is None and policy.decide(rising, 0.051) == "stalled"
    assert policy.decide([(0, 0.01)], 0.05, best=0.04) == "trf"
    assert policy.decide([(0, 0.01)], 0.05, final=True) == "end"
    assert policy.decide([(0, 0.01), (10, 0.06)], 0.05, final=True) is None
    above_then_below = [(0, 0.01), (10, 0.01), (20, 0.06), (30, 0.01), (40, 0.01)]
    assert policy.decide(above_then_below, 0.05) is None  # two in a row since the reset
    assert AlertPolicy(patience=1, warmup_steps=0).decide([(0, 0.01)], 0.05) == "stalled"


def test_replay_alerts_judges_a_history_probe_by_probe() -> None:
    def h(*covs: float) -> dict[int, dict[str, float]]:
        return {10 * i: {"coverage": c, "coverage_trf": c / 0.9} for i, c in enumerate(covs)}

    history = {"grows": h(0.01, 0.01, 0.3), "flat": h(0.01, 0.01, 0.01, 0.01), "ok": h(0.5)}
    thresholds = {"grows": 0.05, "flat": 0.05, "ok": 0.05}
    policy = AlertPolicy(patience=3, warmup_steps=0)
    assert replay_alerts(history, thresholds, policy) == {"flat": (20, "stalled")}
    assert replay_alerts({"flat": h(0.01, 0.01)}, {"flat": 0.05}, policy) == {"flat": (10, "end")}
    small = {"s": {0: {"coverage": 0.01, "coverage_trf": 0.5}}}  # TRF: 2% of the input
    assert replay_alerts(small, {"s": 0.05}, final=False) == {"s": (0, "trf")}
    assert best_coverage({"coverage": 0.01, "coverage_trf": 0.5}) == pytest.approx(0.02)
    assert best_coverage({"coverage": 0.01, "coverage_trf": 0.5, "trf_global": 1.0}) == 1.0
