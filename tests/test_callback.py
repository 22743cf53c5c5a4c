"""ERFMonitor inside real Lightning Trainers (``lightning.pytorch`` and ``pytorch_lightning``)."""

from __future__ import annotations

import importlib
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import erf_monitor as em
from conftest import HANG_GUARD_S
from erf_monitor.sinks import Sink
from erf_monitor.sinks._tensorboard import key_from_tag, tb_tag
from wandb_records import wandb_history

pytest.importorskip("lightning")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

PACKAGES = ["lightning.pytorch", "pytorch_lightning"]
LAYERS = ["net.0", "net.3", "net.7"]
#: What a 2-D layer logs by default (the README's numbers; the Lightning guide's table).
DEFAULT_2D = {
    "erf_size", "coverage", "erf_trf_ratio", "area_t50",
    "sigma_y", "sigma_x", "centroid_offset_y", "centroid_offset_x",
}  # fmt: skip
N_DATA, SIZE = 48, 16


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(N_DATA, 3, SIZE, SIZE, generator=g), torch.randint(
        0, 4, (N_DATA,), generator=g
    )


class DictDataset(Dataset):
    def __init__(self) -> None:
        self.x, self.y = _data()

    def __len__(self) -> int:
        return N_DATA

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"label": self.y[i], "image": self.x[i]}


def make_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),  # 3
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1, dilation=1),  # 7
        nn.ReLU(),
    )


def make_module(
    pkg: str = "lightning.pytorch",
    *,
    batches: str = "tuple",
    image_forward: bool = True,
    val: bool = False,
    val_workers: int = 0,
    stochastic: bool = False,
    poison_at: int | None = None,
    compiled: bool = False,
) -> Any:
    """A small LightningModule built on ``pkg``'s base class."""
    L = importlib.import_module(pkg)

    class Module(L.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            net = make_net()
            self.net = torch.compile(net) if compiled else net
            self.head = nn.Linear(8, 4)

        def classify(self, x: torch.Tensor) -> torch.Tensor:
            if stochastic:  # stochastic depth drawn before the training check, and NumPy noise
                y = self.net[:3](x)
                if random.random() < 0.5 and self.training:
                    y = y * float(1 + np.random.rand())
                return self.head(self.net[3:](y).mean((2, 3)))
            return self.head(self.net(x).mean((2, 3)))

        def forward(self, *args: Any) -> torch.Tensor:
            if not image_forward:
                raise TypeError("forward takes a (text, image) pair in this module")
            return self.classify(args[0])

        def _split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return (batch["image"], batch["label"]) if batches == "dict" else (batch[0], batch[1])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = self._split(batch)
            return F.cross_entropy(self.classify(x), y)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            if poison_at is not None and self.trainer.global_step == poison_at:
                with torch.no_grad():
                    self.net[0].weight.fill_(float("nan"))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

        def train_dataloader(self) -> DataLoader:
            ds = DictDataset() if batches == "dict" else TensorDataset(*_data())
            return DataLoader(ds, batch_size=8, shuffle=True)

    if val:

        def val_dataloader(self: Any) -> DataLoader:
            # One loader object, reused (as users with persistent workers do).
            if getattr(self, "_val_loader", None) is None:
                x, y = _data()
                self._val_loader = DataLoader(
                    TensorDataset(x.flip(0), y),
                    batch_size=8,
                    shuffle=True,
                    num_workers=val_workers,
                    persistent_workers=val_workers > 0,
                )
            return self._val_loader

        def validation_step(self: Any, batch: Any, batch_idx: int) -> None:
            self.classify(batch[0])

        Module.val_dataloader = val_dataloader
        Module.validation_step = validation_step
    return Module()


def make_trainer(
    pkg: str,
    tmp_path: Path,
    callbacks: list[Any],
    max_steps: int = 5,
    logger: Any = False,
    **kwargs: Any,
) -> Any:
    L = importlib.import_module(pkg)
    opts: dict[str, Any] = {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(tmp_path),
        "logger": logger,
        "callbacks": callbacks,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
    }
    opts.update(kwargs)
    return L.Trainer(**opts)


def quiet_monitor(**kwargs: Any) -> em.ERFMonitor:
    opts: dict[str, Any] = {
        "layers": LAYERS,
        "every_n_steps": 2,
        "num_samples": 4,
        "min_coverage": None,
    }
    opts.update(kwargs)
    return em.ERFMonitor(**opts)


def tb_logger(pkg: str, tmp_path: Path) -> Any:
    return importlib.import_module(pkg).loggers.TensorBoardLogger(str(tmp_path), name="tb")


def events(logger: Any) -> EventAccumulator:
    ea = EventAccumulator(
        str(Path(logger.log_dir) / "erf"),  # the monitor's own run, next to Lightning's
        size_guidance={"images": 0, "scalars": 0, "tensors": 0},
    )
    ea.Reload()
    return ea


# ----------------------------------------------------------------------------- loggers
@pytest.mark.parametrize("pkg", PACKAGES)
def test_tensorboard_keys_steps_images(pkg: str, tmp_path: Path) -> None:
    logger = tb_logger(pkg, tmp_path)
    cb = quiet_monitor()
    trainer = make_trainer(pkg, tmp_path, [cb], max_steps=5, logger=logger)
    trainer.fit(make_module(pkg))
    ea = events(logger)
    scalars = {key_from_tag(t) for t in ea.Tags()["scalars"]}  # "erf/<layer>/<metric>"
    images = {key_from_tag(t) for t in ea.Tags()["images"]}
    for layer in LAYERS:
        for metric in ("coverage", "erf_size", "erf_trf_ratio", "area_t50", "sigma_x"):
            steps = [e.step for e in ea.Scalars(tb_tag(f"erf/{layer}/{metric}"))]
            assert steps == [0, 2, 4, 5], (layer, metric, steps)  # start, every 2, end
        assert f"erf/{layer}/heatmap" in images
        assert len(ea.Images(tb_tag(f"erf/{layer}/heatmap"))) == 4
        value = ea.Scalars(tb_tag(f"erf/{layer}/coverage"))[-1].value
        assert value == pytest.approx(cb.history[layer][5]["coverage"])
        # The few numbers that matter, not ~40 per layer; the history keeps the cheap ones
        # too (TRF, extents, moments), never the Gaussian fit or the shape diagnostics.
        tags = {t.removeprefix(f"erf/{layer}/") for t in scalars if t.startswith(f"erf/{layer}/")}
        kept = set(cb.history[layer][5])
        assert tags == DEFAULT_2D and tags < kept and {"trf_size", "area_t20"} <= kept
        assert not {"gauss_fit_r2", "anisotropy", "disc_mass_r5"} & kept
    assert "erf/probe_time_s" in scalars
    assert cb.history["net.7"][0]["trf_size"] == 9.0  # 3 -> 5 (stride 2) -> 5 + 2*2
    assert cb.layers == LAYERS and sorted(cb.history["net.0"]) == [0, 2, 4, 5]


def test_metrics_option_all_and_names(tmp_path: Path) -> None:
    logger = tb_logger("lightning.pytorch", tmp_path)
    cb = quiet_monitor(layers=["net.7"], metrics="all", min_coverage=0.01)
    make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=2, logger=logger).fit(make_module())
    scalars = {key_from_tag(t) for t in events(logger).Tags()["scalars"]}
    assert scalars == {f"erf/net.7/{k}" for k in cb.history["net.7"][2]} | {
        "erf/net.7/min_coverage",
        "erf/probe_time_s",
    }
    calls: list[dict[str, float]] = []
    cb2 = quiet_monitor(
        layers=["net.7"], metrics=["gaussian_r2", "area_t*"],
        sinks=[lambda step, scalars, images: calls.append(scalars)],
    )  # fmt: skip
    make_trainer("lightning.pytorch", tmp_path, [cb2], max_steps=2).fit(make_module())
    assert set(calls[0]) == {
        "erf/net.7/gaussian_r2", "erf/net.7/area_t20", "erf/net.7/area_t30",
        "erf/net.7/area_t50", "erf/net.7/area_t99", "erf/probe_time_s",
    }  # fmt: skip


def test_csv_logger_files(tmp_path: Path) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="csv")
    cb = quiet_monitor()
    trainer = make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=4, logger=logger)
    trainer.fit(make_module())
    # Scalars where CSVLogger users look: columns of its own metrics.csv, as log_metrics puts
    # them (one row per probe); heatmaps, raw maps and alerts beside it, in erf/.
    with (Path(logger.log_dir) / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("erf/net.3/coverage")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    for r in rows:
        assert float(r["erf/net.3/coverage"]) == pytest.approx(
            cb.history["net.3"][int(r["step"])]["coverage"]
        )
        assert r["erf/probe_time_s"] and r["erf/net.7/erf_size"]
    root = Path(logger.log_dir) / "erf"
    assert not (root / "metrics.csv").exists()
    npz = sorted((root / "erf_maps").glob("step_*.npz"))
    assert len(npz) == 3
    maps = np.load(npz[0], allow_pickle=False)
    assert set(maps.files) == {*LAYERS, "__mode__", "__definition__"}
    assert maps["net.0"].shape == (SIZE, SIZE)
    assert len(list(root.rglob("*.png"))) == 3 * len(LAYERS)


@pytest.mark.slow
def test_wandb_offline_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="erf-test")
    try:
        cb = quiet_monitor(layers=["net.7"])
        trainer = make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=2, logger=logger)
        trainer.fit(make_module())
        run_dir = Path(logger.experiment.dir)
        summary = dict(logger.experiment.summary)
    finally:
        wandb.finish()
    pngs = sorted((run_dir / "media" / "images").rglob("*.png"))
    assert len(pngs) == 2  # steps 0 and 2
    assert all("erf/net.7/heatmap" in p.as_posix() for p in pngs)
    assert summary["erf/net.7/coverage"] == pytest.approx(cb.history["net.7"][2]["coverage"])
    # One history row per probe, holding all of it (scalars, heatmap, probe time).
    rows = [h for h in wandb_history(run_dir.parent) if any(k.startswith("erf/") for k in h)]
    assert [h["erf/step"] for h in rows] == [0, 2]  # trainer/global_step: test_dashboards
    for h in rows:
        assert {"erf/net.7/coverage", "erf/probe_time_s", "erf/net.7/heatmap/_type"} <= set(h)


# ----------------------------------------------------------------------------- batches / forward
def test_dict_batches(tmp_path: Path) -> None:
    cb = quiet_monitor(layers=["net.7"])
    make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=2).fit(make_module(batches="dict"))
    assert sorted(cb.history["net.7"]) == [0, 2]
    assert cb.probe_batch is not None and cb.probe_batch.shape == (4, 3, SIZE, SIZE)


def test_no_image_forward_needs_forward_fn(tmp_path: Path) -> None:
    cb = quiet_monitor(layers=["net.7"], forward_fn=lambda m, x: m.classify(x))
    make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=2).fit(
        make_module(image_forward=False)
    )
    assert sorted(cb.history["net.7"]) == [0, 2]
    # without it: one clear warning, training goes on
    cb2 = quiet_monitor(layers=["net.7"])
    with pytest.warns(em.ERFProbeWarning, match="forward"):
        trainer = make_trainer("lightning.pytorch", tmp_path, [cb2], max_steps=2)
        trainer.fit(make_module(image_forward=False))
    assert trainer.global_step == 2 and cb2.history == {}


def test_unknown_layer_raises_at_setup(tmp_path: Path) -> None:
    trainer = make_trainer("lightning.pytorch", tmp_path, [quiet_monitor(layers=["net.77"])])
    with pytest.raises(ValueError, match=r"Unknown layer 'net\.77'.*net\.7"):
        trainer.fit(make_module())
    assert trainer.global_step == 0


# ----------------------------------------------------------------------------- identity
def _fit_state(
    tmp_path: Path,
    callbacks: list[Any],
    trainer_kwargs: dict[str, Any] | None = None,
    **module_kwargs: Any,
) -> dict[str, Any]:
    from lightning.pytorch import seed_everything

    seed_everything(7, workers=True)
    module = make_module(**module_kwargs)
    trainer = make_trainer(
        "lightning.pytorch",
        tmp_path,
        callbacks,
        max_steps=6,
        limit_val_batches=2 if module_kwargs.get("val") else 0,
        **(trainer_kwargs or {}),
    )
    trainer.fit(module)
    opt = trainer.optimizers[0].state_dict()
    return {
        "model": module.state_dict(),
        "opt": opt["state"],
        "rng": torch.get_rng_state(),
        "py": random.getstate(),
        "np": np.random.get_state(),  # (name, key, position, has_gauss, cached_gaussian)
    }


def _assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["opt"].keys() == b["opt"].keys()
    for i in a["opt"]:
        for k, v in a["opt"][i].items():
            assert torch.equal(v, b["opt"][i][k]), (i, k)
    assert torch.equal(a["rng"], b["rng"])
    assert a["py"] == b["py"], "Python's random state differs"
    name, key, pos, has_gauss, gauss = a["np"]
    assert (name, pos, has_gauss, gauss) == b["np"][:1] + b["np"][2:], "NumPy's state differs"
    assert np.array_equal(key, b["np"][1]), "NumPy's random key differs"


@pytest.mark.parametrize("source", ["train", "val"])
def test_bit_for_bit_identical_training(tmp_path: Path, source: str) -> None:
    val = source == "val"
    ref = _fit_state(tmp_path / "a", [], val=val)
    cb = quiet_monitor(every_n_steps=1, probe_inputs=source, layers="auto", min_coverage=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.ERFCoverageWarning)
        got = _fit_state(tmp_path / "b", [cb], val=val)
    assert sorted(cb.history[cb.layers[0]]) == list(range(7))  # it did probe every step
    assert cb.alerts  # and alerted (warn only)
    _assert_identical(ref, got)
    assert any(k.endswith("running_mean") for k in ref["model"])


@pytest.mark.slow
def test_val_probe_batch_from_persistent_workers_keeps_training_identical(tmp_path: Path) -> None:
    """Validation every 2 steps from a shuffled loader with persistent workers; the probe batch
    must come without iterating that loader (which would change every later batch's RNG)."""
    opts: dict[str, Any] = {"trainer_kwargs": {"val_check_interval": 2}, "val": True}
    ref = _fit_state(tmp_path / "a", [], val_workers=2, **opts)
    cb = quiet_monitor(every_n_steps=2, probe_inputs="val")
    got = _fit_state(tmp_path / "b", [cb], val_workers=2, **opts)
    assert cb.probe_batch is not None and sorted(cb.history["net.7"]) == [0, 2, 4, 6]
    _assert_identical(ref, got)
    x, _ = _data()
    assert torch.equal(cb.probe_batch, x.flip(0)[:4])  # the first items in dataset order


def test_stochastic_depth_drawn_with_python_random_keeps_training_identical(
    tmp_path: Path,
) -> None:
    ref = _fit_state(tmp_path / "a", [], stochastic=True)
    cb = quiet_monitor(every_n_steps=1)
    got = _fit_state(tmp_path / "b", [cb], stochastic=True)
    assert sorted(cb.history["net.7"]) == list(range(7))
    _assert_identical(ref, got)  # Python's and NumPy's random states included


# ----------------------------------------------------------------------------- alerts
def _alert_messages(record: Any) -> list[str]:
    return [str(w.message) for w in record if "covers only" in str(w.message)]


def test_coverage_alert_warns_once_per_layer_and_logs(tmp_path: Path) -> None:
    logger = tb_logger("lightning.pytorch", tmp_path)
    cov = {"net.0": 0.5, "net.3": 0.5}  # a float would check the deepest layer only
    cb = quiet_monitor(layers=["net.0", "net.3"], min_coverage=cov, every_n_steps=1)
    with pytest.warns(em.ERFCoverageWarning) as rec:
        make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=3, logger=logger).fit(
            make_module()
        )
    alerts = _alert_messages(rec)
    assert len(alerts) == 2 and len([w for w in rec if "erf-monitor" in str(w.message)]) == 2
    assert "layer 'net.0'" in alerts[0] and "layer 'net.3'" in alerts[1]
    assert "below min_coverage=50.00%" in alerts[0] and "dilated" in alerts[0]
    assert "only an architecture change helps" in alerts[0]  # its 3x3 TRF cannot reach 50%
    assert all(w.filename == __file__ for w in rec if "erf-monitor" in str(w.message))
    assert cb.alerts == {"net.0": 0, "net.3": 0}
    tensors = set(events(logger).Tags()["tensors"])
    assert any("erf_coverage/net.0" in t for t in tensors), tensors


def test_coverage_alert_stop(tmp_path: Path) -> None:
    cb = quiet_monitor(layers=["net.3"], min_coverage=0.5, on_insufficient="stop")
    trainer = make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=20)
    with pytest.warns(em.ERFCoverageWarning):
        trainer.fit(make_module())
    assert trainer.global_step < 20 and trainer.should_stop


def test_coverage_alert_raise(tmp_path: Path) -> None:
    cb = quiet_monitor(layers=["net.3"], min_coverage=0.5, on_insufficient="raise")
    trainer = make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=20)
    with pytest.raises(em.ERFCoverageWarning, match="covers only"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(make_module())
    assert trainer.global_step == 0


class _BrokenSink(Sink):
    def log_scalars(self, scalars: Any, step: int) -> None:
        raise OSError("No space left on device")


@pytest.mark.parametrize("broken", ["sink", "probe"])
def test_failure_warnings_never_end_training_under_an_error_filter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str
) -> None:
    """``python -W error`` / ``filterwarnings = error``: a failing sink or probe is logged at
    ERROR level (training continues, as the message says) instead of raised; strict=True
    still raises."""
    import logging

    kw: dict[str, Any] = {"layers": ["net.7"]}
    if broken == "sink":
        kw["sinks"] = [_BrokenSink()]
    else:  # a probe batch the model cannot take: 1 channel for a 3-channel model
        kw["probe_inputs"] = torch.randn(2, 1, SIZE, SIZE)
    cb = quiet_monitor(**kw)
    trainer = make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=4)
    with warnings.catch_warnings(), caplog.at_level(logging.ERROR, logger="erf_monitor"):
        warnings.filterwarnings("error", category=UserWarning, message="erf-monitor")
        trainer.fit(make_module())
    assert trainer.global_step == 4
    expected = "No space left on device" if broken == "sink" else "could not be set up"
    assert expected in caplog.text and "logged instead" in caplog.text, caplog.text

    strict = quiet_monitor(**kw, strict=True)
    with warnings.catch_warnings(), pytest.raises(Exception, match=r"space left|channels"):
        warnings.filterwarnings("error", category=UserWarning, message="erf-monitor")
        make_trainer("lightning.pytorch", tmp_path, [strict], max_steps=4).fit(make_module())


# ----------------------------------------------------------------------------- resume
def test_checkpoint_resume(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckdir = tmp_path / "ckpt"
    cb1 = quiet_monitor(min_coverage={"net.0": 0.5})
    ck = ModelCheckpoint(dirpath=str(ckdir), every_n_train_steps=2, save_top_k=-1)
    with pytest.warns(em.ERFCoverageWarning):
        make_trainer(
            "lightning.pytorch", tmp_path, [cb1, ck], max_steps=4, enable_checkpointing=True
        ).fit(make_module())
    path = ckdir / "epoch=0-step=4.ckpt"
    assert sorted(cb1.history["net.0"]) == [0, 2, 4]
    state = torch.load(path, weights_only=True)["callbacks"][cb1.state_key]
    assert torch.equal(state["probe_batch"], cb1.probe_batch)
    assert state["history"] == cb1.history and state["alerted"] == {"net.0": 0}

    cb2 = quiet_monitor(min_coverage={"net.0": 0.5})
    with warnings.catch_warnings():
        # alert state restored: no repeated alert (the setup TRF warning may repeat)
        warnings.filterwarnings("error", ".*covers only", em.ERFCoverageWarning)
        trainer = make_trainer("lightning.pytorch", tmp_path, [cb2], max_steps=8)
        trainer.fit(make_module(), ckpt_path=str(path))
    assert trainer.global_step == 8
    assert cb2.probe_batch is not None and torch.equal(cb2.probe_batch, cb1.probe_batch)
    assert sorted(cb2.history["net.0"]) == [0, 2, 4, 6, 8]  # no second probe at step 4
    for step in (0, 2, 4):
        assert cb2.history["net.0"][step] == cb1.history["net.0"][step]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ({"version": 2}, "newer erf-monitor: state version 2"),  # a later library's state
        ({"last_probe_step": "four"}, "invalid literal for int()"),
        ({"probe_batch": torch.zeros(3, dtype=torch.uint8)}, "not a floating-point image"),
    ],
)
def test_resume_with_unreadable_monitor_state_finishes_training(
    tmp_path: Path, damage: dict[str, Any], reason: str
) -> None:
    """State the monitor cannot read is one warning that says what was lost; the monitor
    starts afresh at the resumed step and training resumes (``strict=True`` raises)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb1 = quiet_monitor()
    ck = ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)
    trainer = make_trainer(
        "lightning.pytorch", tmp_path, [cb1, ck], max_steps=4, enable_checkpointing=True
    )
    trainer.fit(make_module())
    path = tmp_path / "ck" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["callbacks"][cb1.state_key].update(damage)
    torch.save(ckpt, path)

    cb2 = quiet_monitor()
    trainer = make_trainer("lightning.pytorch", tmp_path, [cb2], max_steps=8)
    with pytest.warns(em.ERFProbeWarning) as rec:
        trainer.fit(make_module(), ckpt_path=str(path))
    assert trainer.global_step == 8
    (msg,) = [str(w.message) for w in rec if issubclass(w.category, em.ERFProbeWarning)]
    assert reason in msg and "ERF history and alert state are lost" in msg, msg
    assert sorted(cb2.history["net.7"]) == [4, 6, 8]  # afresh: probed at the resumed step
    assert cb2.probe_batch is not None

    strict = quiet_monitor(strict=True)
    with pytest.raises((ValueError, TypeError), match=reason.split(":")[0]):
        make_trainer("lightning.pytorch", tmp_path, [strict], max_steps=8).fit(
            make_module(), ckpt_path=str(path)
        )


def test_resume_from_last_does_not_probe_the_checkpoint_step_again(tmp_path: Path) -> None:
    """``fit(ckpt_path="last")``: the checkpoint is saved at the end of the epoch, before the
    final probe of that fit; the resumed fit must not probe and log that step again."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    logged: list[int] = []

    def run(max_steps: int, **fit: Any) -> em.ERFMonitor:
        cb = quiet_monitor(
            layers=["net.7"], every_n_steps=4,
            sinks=[lambda step, scalars, images: logged.append(step)],
        )  # fmt: skip
        ck = ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)
        trainer = make_trainer(
            "lightning.pytorch", tmp_path, [cb, ck], max_steps=max_steps,
            enable_checkpointing=True,
        )  # fmt: skip
        trainer.fit(make_module(), **fit)
        return cb

    first = run(10)  # 6 batches an epoch: the last checkpoint is written at step 10
    assert logged == [0, 4, 8, 10]
    second = run(16, ckpt_path="last")
    assert logged == [0, 4, 8, 10, 12, 16]  # step 10 logged once
    assert sorted(second.history["net.7"]) == [0, 4, 8, 12, 16]  # the checkpoint's history
    assert torch.equal(second.probe_batch, first.probe_batch)


def test_reused_monitor_starts_afresh_for_a_new_trainer_and_model(tmp_path: Path) -> None:
    calls: list[tuple[int, set[str]]] = []
    cb = quiet_monitor(
        layers=["net.7"], min_coverage=0.01,
        sinks=[lambda step, scalars, images: calls.append((step, set(scalars)))],
    )  # fmt: skip
    make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=6).fit(make_module())
    first_batch = cb.probe_batch
    assert sorted(cb.history["net.7"]) == [0, 2, 4, 6]
    # One call per probe, with every scalar of it (thresholds and probe time included).
    assert [step for step, _ in calls] == [0, 2, 4, 6]
    assert all({"erf/net.7/min_coverage", "erf/probe_time_s"} <= keys for _, keys in calls)
    assert all(len(keys) == len(DEFAULT_2D) + 2 for _, keys in calls)

    calls.clear()
    other = TensorDataset(torch.randn(16, 3, SIZE, SIZE) + 5, torch.randint(0, 4, (16,)))
    trainer = make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=3)
    trainer.fit(make_module(), DataLoader(other, batch_size=8))
    assert sorted(cb.history["net.7"]) == [0, 2, 3]  # the new run only
    assert torch.equal(cb.probe_batch, other.tensors[0][:4])  # the new run's images
    assert not torch.equal(cb.probe_batch, first_batch)
    assert [step for step, _ in calls] == [0, 2, 3]


def test_reused_monitor_starts_afresh_for_a_new_trainer_of_the_same_model(tmp_path: Path) -> None:
    cb = quiet_monitor(layers=["net.7"])
    module = make_module()
    make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=4).fit(module)
    assert sorted(cb.history["net.7"]) == [0, 2, 4]
    first_batch = cb.probe_batch
    other = TensorDataset(torch.randn(16, 3, SIZE, SIZE) + 5, torch.randint(0, 4, (16,)))
    make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=1).fit(
        module, DataLoader(other, batch_size=8)
    )
    assert sorted(cb.history["net.7"]) == [0, 1]  # the new run only
    assert torch.equal(cb.probe_batch, other.tensors[0][:4])  # the new Trainer's images
    assert not torch.equal(cb.probe_batch, first_batch)


def test_custom_logger_gets_scalars_and_images(tmp_path: Path) -> None:
    """A Lightning Logger erf-monitor does not know: scalars through its log_metrics, images
    through its log_image, as Lightning's own monitors do."""
    from lightning.pytorch.loggers import Logger

    class Recording(Logger):  # type: ignore[misc]
        name, version = "recording", 0

        def __init__(self) -> None:
            super().__init__()
            self.metrics: list[tuple[int | None, dict[str, float]]] = []
            self.images: list[tuple[str, int, tuple[int, ...]]] = []

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.metrics.append((step, dict(metrics)))

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None: ...

        def log_image(self, key: str, images: list[Any], step: int | None = None) -> None:
            self.images.append((key, int(step or 0), tuple(np.asarray(images[0]).shape)))

    logger = Recording()
    cb = quiet_monitor(layers=["net.7"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=4, logger=logger).fit(
            make_module()
        )
    assert not [w for w in caught if "erf-monitor" in str(w.message)]  # no "no sink" warning
    erf = [(step, m) for step, m in logger.metrics if "erf/net.7/coverage" in m]
    assert [step for step, _ in erf] == [0, 2, 4]
    assert erf[-1][1]["erf/net.7/coverage"] == pytest.approx(cb.history["net.7"][4]["coverage"])
    assert [(k, s) for k, s, _ in logger.images] == [("erf/net.7/heatmap", s) for s in (0, 2, 4)]
    assert logger.images[0][2][2] == 3  # (H, W, 3) RGB


def test_manual_optimization_with_two_optimizers_counts_both(tmp_path: Path) -> None:
    """Documented: global_step counts the steps of both optimizers (2 per batch)."""
    import lightning.pytorch as L

    class TwoOptimizers(L.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.net, self.head = make_net(), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.net(x).mean((2, 3)))

        def training_step(self, batch: Any, batch_idx: int) -> None:
            for opt in self.optimizers():
                opt.zero_grad()
                self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]))
                opt.step()

        def configure_optimizers(self) -> list[torch.optim.Optimizer]:
            return [torch.optim.SGD(self.net.parameters()), torch.optim.SGD(self.head.parameters())]

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(*_data()), batch_size=8)

    cb = quiet_monitor(layers=["net.7"], every_n_steps=5)
    trainer = make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=16)
    trainer.fit(TwoOptimizers())
    assert sorted(cb.history["net.7"]) == [0, 6, 10, 16]


# ----------------------------------------------------------------------------- training setups
def test_bf16_mixed(tmp_path: Path) -> None:
    cb = quiet_monitor(layers=["net.7"])
    make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=2, precision="bf16-mixed").fit(
        make_module()
    )
    assert sorted(cb.history["net.7"]) == [0, 2]
    assert cb.latest is not None and cb.latest["net.7"].heatmap.dtype == torch.float32
    assert np.isfinite(cb.history["net.7"][2]["coverage"])


def test_gradient_accumulation_probes_on_optimizer_steps_only(tmp_path: Path) -> None:
    cb = quiet_monitor(layers=["net.7"], every_n_steps=1)
    trainer = make_trainer(
        "lightning.pytorch", tmp_path, [cb], max_steps=3, accumulate_grad_batches=2
    )
    trainer.fit(make_module())
    assert trainer.global_step == 3
    assert sorted(cb.history["net.7"]) == [0, 1, 2, 3]  # 6 micro-batches, 3 optimizer steps


def require_cxx_compiler() -> None:
    """Skip only when torch.compile's CPU backend (inductor) has no C++ compiler to call: the
    one case where the feature cannot run here. Any other error of a compiled run fails."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    if not any(shutil.which(name) for name in names):
        pytest.skip(f"no C++ compiler ({' or '.join(names)}) for torch.compile's inductor")


@pytest.mark.slow
def test_torch_compile_module(tmp_path: Path) -> None:
    cb = quiet_monitor(layers=["net.3", "net.7"])
    require_cxx_compiler()
    module = make_module(compiled=True)
    make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=2).fit(module)
    assert sorted(cb.history["net.7"]) == [0, 2]
    eager = em.compute_erf(module.net._orig_mod, cb.probe_batch, ["3", "7"])
    assert torch.allclose(cb.latest["net.7"].heatmap, eager["7"].heatmap)


@pytest.mark.slow
def test_torch_compile_lightning_module_keeps_its_trf(tmp_path: Path) -> None:
    """``Trainer.fit(torch.compile(module))``: the TRF is analysed (no warning) and every
    metric equals the eager probe's."""
    cb = quiet_monitor(layers=["net.3", "net.7"])
    module = make_module()
    require_cxx_compiler()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=2).fit(torch.compile(module))
    assert not [str(w.message) for w in rec if issubclass(w.category, em.ERFProbeWarning)]
    r = cb.latest["net.7"]
    assert r.trf is not None and r.trf.size == (9.0, 9.0)
    eager = em.compute_erf(module.net, cb.probe_batch, ["3", "7"])["7"]
    assert r.centre_pixel == eager.centre_pixel
    assert r.scalars() == pytest.approx(eager.scalars(), rel=1e-6)


class BrokenSink(Sink):
    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        raise ConnectionError("backend is down")


def test_raising_sink_keeps_training(tmp_path: Path) -> None:
    cb = quiet_monitor(layers=["net.7"], sinks=[BrokenSink(), str(tmp_path / "files")])
    with pytest.warns(UserWarning, match="backend is down") as rec:
        trainer = make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=4)
        trainer.fit(make_module())
    assert len([w for w in rec if "backend is down" in str(w.message)]) == 1
    assert trainer.global_step == 4 and sorted(cb.history["net.7"]) == [0, 2, 4]
    assert (tmp_path / "files" / "metrics.csv").exists()  # the other sink still got its data


def test_layer_turning_nan_skips_probes(tmp_path: Path) -> None:
    cb = quiet_monitor(layers=["net.7"], every_n_steps=1)
    with pytest.warns(em.ERFProbeWarning, match="NaN") as rec:
        trainer = make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=5)
        trainer.fit(make_module(poison_at=2))
    assert trainer.global_step == 5
    # the callback probes before the module poisons step 2: probes from step 3 on are skipped
    assert sorted(cb.history["net.7"]) == [0, 1, 2]
    assert len([w for w in rec if issubclass(w.category, em.ERFProbeWarning)]) == 1


def test_noise_probe_inputs(tmp_path: Path) -> None:
    cb = quiet_monitor(layers=["net.7"], probe_inputs="noise", num_samples=3)
    make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=2).fit(make_module())
    assert cb.probe_batch is not None and cb.probe_batch.shape == (3, 3, SIZE, SIZE)
    x, _ = _data()
    assert not torch.equal(cb.probe_batch, x[:3])


def test_user_tensor_probe_inputs(tmp_path: Path) -> None:
    probe = torch.randn(2, 3, SIZE, SIZE)
    cb = quiet_monitor(layers=["net.7"], probe_inputs=probe)
    make_trainer("lightning.pytorch", tmp_path, [cb], max_steps=2).fit(make_module())
    assert cb.probe_batch is not None and torch.equal(cb.probe_batch, probe)
    assert sorted(cb.history["net.7"]) == [0, 2]


def test_lazy_import() -> None:
    code = (
        "import sys, erf_monitor; assert 'lightning' not in sys.modules, 'eager lightning import'"
    )
    import subprocess
    import sys

    env = dict(os.environ)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=HANG_GUARD_S)
