"""The framework-free engine: validation, schedule, probe batch, alerts, state, failures."""

from __future__ import annotations

import io
import random
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

import erf_monitor as em
from erf_monitor.monitor.engine import MonitorEngine
from erf_monitor.sinks import FileSink, Sink


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
    )


def batch(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(1))


class RaisingSink(Sink):
    """A real sink whose backend is broken: every call raises."""

    def __init__(self) -> None:
        self.calls = 0

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        self.calls += 1
        raise OSError("disk full")


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"every_n_steps": 1.5}, TypeError, "every_n_steps"),
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"min_coverage": 1.5}, ValueError, "min_coverage"),
        ({"min_coverage": {"a": 0}}, ValueError, "min_coverage"),
        ({"patience": 0}, ValueError, "patience"),
        ({"on_insufficient": "panic"}, ValueError, "on_insufficient"),
        ({"probe_inputs": "test"}, ValueError, "probe_inputs"),
        ({"probe_inputs": torch.zeros(3, 4)}, ValueError, "probe_inputs"),
        ({"layers": []}, ValueError, "layers"),
        ({"layers": [1]}, TypeError, "strings"),
        ({"mode": "x"}, ValueError, "mode"),
        ({"forward_fn": 3}, TypeError, "forward_fn"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        MonitorEngine(**kwargs)


def test_unknown_layer_names_available() -> None:
    eng = MonitorEngine(layers=["0", "conv9"])
    with pytest.raises(ValueError, match=r"Unknown layer 'conv9'.*0, 1, 2, 3, 4"):
        eng.check_layers(tiny_net())
    with pytest.raises(ValueError, match="matches no module"):
        MonitorEngine(layers=["0"], min_coverage={"head": 0.1}).check_layers(tiny_net())


# ----------------------------------------------------------------------------- schedule
def test_schedule_every_n_force_and_crossing() -> None:
    eng = MonitorEngine(every_n_steps=3)
    assert eng.should_probe(0)
    eng.mark(0)
    assert not eng.should_probe(0, force=True)  # never twice at one step
    probed = []
    for step in range(1, 10):
        if eng.should_probe(step):
            eng.mark(step)
            probed.append(step)
    assert probed == [3, 6, 9]
    eng.mark(2)
    assert eng.should_probe(2 + 2)  # a batch that advanced 2 steps crossed step 3
    eng.mark(4)
    assert not eng.should_probe(5)
    assert eng.should_probe(5, force=True)  # fit end


# ----------------------------------------------------------------------------- probe batch
def test_probe_batch_is_a_detached_cpu_copy() -> None:
    eng = MonitorEngine(num_samples=2)
    x = batch().requires_grad_(True)
    eng.capture((x, torch.zeros(4)))
    pb = eng.probe_batch
    assert pb is not None and pb.shape == (2, 1, 16, 16) and pb.device.type == "cpu"
    assert (
        not pb.requires_grad and pb.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    )
    before = pb.clone()
    with torch.no_grad():
        x.mul_(0)
    assert torch.equal(pb, before)


def test_noise_probe_is_seeded_and_leaves_global_rng() -> None:
    state = torch.get_rng_state()
    a, b = MonitorEngine(probe_inputs="noise", num_samples=3), MonitorEngine(probe_inputs="noise")
    a.capture(batch(2))
    b.capture(batch(2))
    assert torch.equal(torch.get_rng_state(), state)
    assert a.probe_batch is not None and b.probe_batch is not None
    assert a.probe_batch.shape == (3, 1, 16, 16)  # num_samples, not the batch size
    assert torch.equal(a.probe_batch, b.probe_batch[:3])


def test_capture_from_shuffled_loader_leaves_every_rng() -> None:
    loader = DataLoader(TensorDataset(batch(8), torch.zeros(8)), batch_size=4, shuffle=True)
    eng = MonitorEngine(probe_inputs="val", num_samples=2)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    eng.capture_from_loader([loader])
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert eng.probe_batch is not None and eng.probe_batch.shape == (2, 1, 16, 16)


class AugmentedData(Dataset):
    """Images with a random flip drawn from the dataset's own NumPy generator."""

    def __init__(self) -> None:
        self.x = batch(8)
        self.rng = np.random.default_rng(5)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        flip = bool(self.rng.random() < 0.5)
        return (self.x[i].flip(-1) if flip else self.x[i]), i


@pytest.mark.parametrize("workers", [0, 2])
def test_capture_from_loader_never_touches_the_loader(workers: int) -> None:
    ds = AugmentedData()
    gen = torch.Generator().manual_seed(3)
    loader = DataLoader(
        ds,
        batch_size=4,
        sampler=RandomSampler(ds, generator=gen),
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    states = gen.get_state(), ds.rng.bit_generator.state, torch.get_rng_state()
    eng = MonitorEngine(probe_inputs="val", num_samples=3)
    eng.capture_from_loader(loader)
    assert loader._iterator is None  # no iterator (no workers started, nothing consumed)
    assert torch.equal(gen.get_state(), states[0])  # the sampler's own generator
    assert ds.rng.bit_generator.state == states[1]  # the dataset's own generator
    assert torch.equal(torch.get_rng_state(), states[2])
    # The first items in dataset order, as the dataset gives them (flips drawn from a copy of
    # its generator's state, which is then put back).
    rng = np.random.default_rng(5)
    expected = [ds.x[i].flip(-1) if rng.random() < 0.5 else ds.x[i] for i in range(3)]
    assert eng.probe_batch is not None
    assert torch.equal(eng.probe_batch, torch.stack(expected))


def test_capture_refuses_one_shot_iterators() -> None:
    eng = MonitorEngine(probe_inputs="val", num_samples=2)
    with pytest.raises(ValueError, match="one-shot"):
        eng.capture_from_loader([iter([batch(2)])])


# ----------------------------------------------------------------------------- probing + logging
def test_probe_logs_history_and_files(tmp_path: Path) -> None:
    net = tiny_net()
    eng = MonitorEngine(layers=["0", "4"], num_samples=2, min_coverage=None)
    eng.set_sinks([FileSink(tmp_path)])
    eng.set_probe_batch(batch())
    out = eng.probe(net, 7)
    assert out.results is not None and set(out.results) == {"0", "4"}
    assert out.seconds > 0 and not out.alerts
    assert set(eng.history) == {"0", "4"} and list(eng.history["0"]) == [7]
    assert eng.history["0"][7]["coverage"] == pytest.approx(out.results["0"].coverage)
    assert eng.history["0"][7]["trf_size"] == 3.0
    csv = (tmp_path / "metrics.csv").read_text()
    for key in ("erf/0/coverage", "erf/4/erf_size", "erf/probe_time_s"):
        assert f"7,{key}," in csv
    maps = np.load(next(tmp_path.rglob("*.npz")), allow_pickle=False)
    assert set(maps.files) == {"0", "4", "__mode__", "__definition__"}
    assert maps["0"].shape == (16, 16)


def test_auto_layers_threshold_applies_to_deepest_only() -> None:
    eng = MonitorEngine(layers="auto", num_samples=2, min_coverage=0.9)
    eng.set_probe_batch(batch())
    with pytest.warns(em.ERFCoverageWarning) as rec:
        out = eng.probe(tiny_net(), 0)
    assert eng.layer_names is not None and len(eng.layer_names) == 2
    assert len(out.alerts) == 1 and repr(eng.layer_names[-1]) in out.alerts[0]
    assert set(eng.alerted) == {eng.layer_names[-1]}
    assert len(rec) == 1  # the TRF notice is logged information, not a warning


def test_deepest_layer_reads_module_paths_not_spellings() -> None:
    """A float min_coverage checks the layer whose module runs last, however its spec is
    spelled: a wrapper's ``module.`` prefix or an output selector names the same module (the
    old spelling-based order ranked "module.2" and "module.0" alike and kept the later)."""

    eng = MonitorEngine(layers=["module.2", "module.0"], num_samples=2, min_coverage=0.99)
    eng.set_probe_batch(batch())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eng.probe(nn.DataParallel(tiny_net()), 0)  # on CPU: calls the module
    assert eng._thresholds == {"module.2": 0.99}


class _Res(nn.Module):
    """x + 0.05 * conv(x): a wide TRF (dilation 4) but an ERF concentrated at the centre."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=4, dilation=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.05 * self.conv(x)


def residual_net() -> nn.Module:
    """Layer "4": TRF 14x14 px (77% of a 16x16 input), ERF 11 px (47%): 0.7 is reachable."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _Res(), _Res(), nn.Identity(), _Res())


def test_alert_patience_reset_and_once_per_layer(tmp_path: Path) -> None:
    net = residual_net()
    eng = MonitorEngine(
        layers=["2", "4"], num_samples=2, min_coverage={"4": 0.7}, patience=2, alert_warmup=0
    )
    eng.set_sinks([FileSink(tmp_path)])
    eng.set_probe_batch(batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert eng.probe(net, 0).alerts == []  # 1 of 2
    eng.history["4"][0]["coverage"] = 1.0  # as if that probe had been above the threshold
    assert eng.probe(net, 1).alerts == []
    with pytest.warns(em.ERFCoverageWarning) as rec:
        alerts = eng.probe(net, 2).alerts
    assert len(alerts) == 1 and len(rec) == 1
    msg = str(rec[0].message)
    for part in ("layer '4'", "below min_coverage=70.00%", "2 consecutive", "dilated", "kernels"):
        assert part in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert eng.probe(net, 3).alerts == []  # once per layer
    assert eng.alerted == {"4": 2}
    assert "layer '4'" in (tmp_path / "alerts.jsonl").read_text()


def test_min_coverage_keys_use_the_layers_glob_dialect() -> None:
    """``*`` stays within one dotted segment, as in ``layers=``; ``**`` crosses segments; the
    first key that matches a layer gives its threshold."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())
    net = nn.Sequential(block, nn.Conv2d(2, 1, 3, padding=1))
    cov = {"0*": 0.01, "**": 0.02}
    eng = MonitorEngine(layers=["0", "0.0", "1"], num_samples=2, min_coverage=cov)
    eng.check_layers(net)
    eng.set_probe_batch(batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 3x3 px of 16x16 is 3.5%: nothing to alert
        eng.probe(net, 0)
    assert eng._thresholds == {"0": 0.01, "0.0": 0.02, "1": 0.02}  # "0*" is not "0.0"
    with pytest.raises(ValueError, match="matches no module"):  # fnmatch's "0*1" took "0.1"
        MonitorEngine(layers=["0"], min_coverage={"0*1": 0.5}).check_layers(net)


def test_unreachable_threshold_alerts_without_waiting_for_patience() -> None:
    # tiny_net's layer "4" has a 7x7 TRF: at most 19% of a 16x16 input, whatever training does
    eng = MonitorEngine(layers=["4"], num_samples=2, min_coverage=0.5, patience=5)
    eng.set_probe_batch(batch())
    with pytest.warns(em.ERFCoverageWarning, match="only an architecture change helps"):
        assert len(eng.probe(tiny_net(), 0).alerts) == 1
    assert eng.alerted == {"4": 0}


# ----------------------------------------------------------------------------- state
def test_state_dict_roundtrip_weights_only() -> None:
    eng = MonitorEngine(layers=["4"], num_samples=2, min_coverage=0.9)
    eng.set_probe_batch(batch())
    with pytest.warns(em.ERFCoverageWarning):
        eng.probe(tiny_net(), 0)
    buf = io.BytesIO()
    torch.save(eng.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = MonitorEngine(layers=["4"], num_samples=2, min_coverage=0.9)
    other.load_state_dict(state)
    assert other.probe_batch is not None and eng.probe_batch is not None
    assert torch.equal(other.probe_batch, eng.probe_batch)
    assert other.history == eng.history and other.alerted == {"4": 0}
    assert other.last_probe_step == 0 and not other.should_probe(0, force=True)


# ----------------------------------------------------------------------------- failures
def test_nan_probe_is_skipped_with_a_warning() -> None:
    net = tiny_net()
    with torch.no_grad():
        net[2].weight.fill_(float("nan"))
    eng = MonitorEngine(layers=["4"], num_samples=2, min_coverage=None)
    eng.set_probe_batch(batch())
    with pytest.warns(em.ERFProbeWarning, match="NaN"):
        assert eng.probe(net, 0).results is None
    assert eng.history == {}
    strict = MonitorEngine(layers=["4"], num_samples=2, min_coverage=None, strict=True)
    strict.set_probe_batch(batch())
    with pytest.raises(em.ERFProbeError):
        strict.probe(net, 0)


def test_raising_sink_reported_once_or_reraised_when_strict() -> None:
    sink = RaisingSink()
    eng = MonitorEngine(layers=["4"], num_samples=2, min_coverage=None)
    eng.set_sinks([sink])
    eng.set_probe_batch(batch())
    with pytest.warns(UserWarning, match="disk full") as rec:
        eng.probe(tiny_net(), 0)
        eng.probe(tiny_net(), 1)
    assert len([w for w in rec if "disk full" in str(w.message)]) == 1
    assert sink.calls >= 2 and list(eng.history["4"]) == [0, 1]
    strict = MonitorEngine(layers=["4"], num_samples=2, min_coverage=None, strict=True)
    strict.set_sinks([RaisingSink()])
    strict.set_probe_batch(batch())
    with pytest.raises(OSError, match="disk full"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strict.probe(tiny_net(), 0)
