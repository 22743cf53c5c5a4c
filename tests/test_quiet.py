"""Quiet, useful defaults: no warning on a healthy model with the README's settings; a warning,
when there is one, points at the user's own line and fits in two lines."""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import erf_monitor as em

SIZE = 64


class Block(nn.Module):
    """ResNet basic block (two 3x3 convolutions + BatchNorm, identity or strided 1x1 shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.short(x))


class ResNet3(nn.Module):
    """A healthy 3-stage CIFAR-style ResNet (strides 1, 2, 2; two blocks per stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(Block(16, 16, 1), Block(16, 16, 1))
        self.layer2 = nn.Sequential(Block(16, 32, 2), Block(32, 32, 1))
        self.layer3 = nn.Sequential(Block(32, 64, 2), Block(64, 64, 1))
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(F.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (64,)))
    return DataLoader(data, batch_size=16)


#: The README's settings (every_n_steps shortened so that a short test probes several times).
README = {"layers": ["layer2", "layer3"], "num_samples": 8, "min_coverage": 0.05}


def ours(record: list[warnings.WarningMessage]) -> list[str]:
    """The warnings erf-monitor emitted (not Lightning's or torch's own)."""
    kinds = (em.ERFCoverageWarning, em.ERFProbeWarning)
    return [
        str(w.message)
        for w in record
        if issubclass(w.category, kinds) or str(w.message).startswith("erf-monitor")
    ]


def test_healthy_model_watch_is_silent() -> None:
    torch.manual_seed(0)
    net = ResNet3()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with em.watch(net, optimizer=opt, every_n_steps=2, summary=False, **README) as w:
            for x, y in loader():
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
    assert ours(record) == []
    assert sorted(w.history["layer3"]) == [0, 2, 4]
    assert w.alerts == {}


def test_healthy_model_lightning_is_silent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pl = pytest.importorskip("lightning.pytorch")

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = ResNet3()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone(x)

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    settings = {**README, "layers": [f"backbone.{n}" for n in README["layers"]]}
    monitor = em.ERFMonitor(every_n_steps=2, **settings)
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(Lit(), loader())
    assert ours(record) == []
    assert sorted(monitor.history["backbone.layer3"]) == [0, 2, 4]
    out = capsys.readouterr().out  # the end-of-fit summary, on by default
    assert "ERF over training (steps 0 → 4, 3 probes)" in out and "backbone.layer3" in out


def test_float_threshold_checks_the_deepest_watched_layer_only() -> None:
    torch.manual_seed(0)
    net = ResNet3()
    x = next(iter(loader()))[0]
    # Named shallow-first or deep-first: the deepest in the model is the one checked.
    cases = {("layer1", "layer3"): "layer3", ("layer3", "layer1"): "layer3"}
    cases.update({("layer3.0", "layer1"): "layer3.0", ("layer3", "layer3.1.conv2"): "layer3"})
    for layers, deepest in cases.items():
        w = em.watch(net, layers=list(layers), min_coverage=1.0, probe_inputs=x, summary=False)
        with pytest.warns(em.ERFCoverageWarning) as record:
            w.probe()
        w.remove()
        assert len(record) == 1 and repr(deepest) in str(record[0].message), layers
        assert set(w.alerts) == {deepest}
    # A mapping checks exactly the layers it names.
    w = em.watch(net, layers=["layer1", "layer3"], min_coverage={"layer1": 1.0}, probe_inputs=x)
    with pytest.warns(em.ERFCoverageWarning):
        w.probe()
    w.remove()
    assert set(w.alerts) == {"layer1"}


def small_rf_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))


def test_warning_points_at_the_users_line_and_is_short(caplog: pytest.LogCaptureFixture) -> None:
    net = small_rf_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    w = em.watch(net, layers=["2"], optimizer=opt, every_n_steps=1, summary=False)
    x = torch.randn(4, 3, SIZE, SIZE)
    caplog.set_level(logging.INFO, logger="erf_monitor")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        net(x).mean().backward()
        opt.step()  # the first optimizer step probes step 0: the alert fires here
        line = inspect.currentframe().f_lineno - 1  # type: ignore[union-attr]
    w.remove()
    alerts = [r for r in record if issubclass(r.category, em.ERFCoverageWarning)]
    assert len(alerts) == 1, [str(r.message) for r in record]
    assert alerts[0].filename == __file__ and alerts[0].lineno == line
    text = str(alerts[0].message)
    assert len(text.splitlines()) <= 2 and len(text) < 400, text
    expected = (f"{SIZE}x{SIZE}", "5x5 px", "min_coverage=5.00%", "dilat", "layer '2'")
    for part in ("covers only", *expected):
        assert part in text, (part, text)
    # The TRF notice is information, logged once, not a warning.
    notes = [r for r in caplog.records if "theoretical receptive field" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    assert not any("theoretical receptive field" in str(r.message) for r in record)


def test_lightning_warning_points_at_the_fit_call(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_rf_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            return self(batch[0]).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        callbacks=[em.ERFMonitor(layers=["net.2"], every_n_steps=1, summary=False)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(Lit(), loader())
        line = inspect.currentframe().f_lineno - 1  # type: ignore[union-attr]
    alerts = [r for r in record if issubclass(r.category, em.ERFCoverageWarning)]
    assert len(alerts) == 1
    assert (alerts[0].filename, alerts[0].lineno) == (__file__, line)


def test_end_of_training_summary(capsys: pytest.CaptureFixture[str]) -> None:
    net = small_rf_net()
    x = torch.randn(2, 3, 16, 16)
    with em.watch(net, layers=["0", "2"], probe_inputs=x, min_coverage=0.5) as w:
        with pytest.warns(em.ERFCoverageWarning):
            w.probe()
        w.step()
    out = capsys.readouterr().out
    assert "ERF over training (steps 0 → 1, 2 probes)" in out
    assert "\n  0 " in out and "\n  2 " in out  # the layers' rows
    for cell in ("3 → 3", "5 → 5", "not checked", "step 0 (50%)", "monitor.alerts"):
        assert cell in out, (cell, out)
    with em.watch(net, layers=["2"], probe_inputs=x, min_coverage=None, summary=False):
        pass
    assert capsys.readouterr().out == ""
