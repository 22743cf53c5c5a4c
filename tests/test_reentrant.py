"""Probes never run inside the user's code: step boundaries, several monitors, other threads.

The user's own forward hooks fire during a probe's forward (they are part of the model);
``em.is_probing()`` tells them apart. Several watchers and ``compute_erf`` calls share a
model; a thread doing inference beside a probe is never touched by the probe's hooks.
"""

from __future__ import annotations

import logging
import queue
import threading
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import erf_monitor as em
from conftest import HANG_GUARD_S


def make_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Conv2d(8, 8, 3, padding=1),  # 4: TRF 5x5
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def data(n_batches: int, nan_first: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    out = [
        (torch.randn(6, 3, 12, 12, generator=g), torch.randint(0, 4, (6,), generator=g))
        for _ in range(n_batches)
    ]
    if nan_first:
        out[0][0][0, 1, 5, 5] = float("nan")  # one pixel
    return out


def test_is_probing_is_public_and_false_outside_probes() -> None:
    assert "is_probing" in em.__all__
    assert em.is_probing() is False
    seen: list[bool] = []
    net = make_net()
    net[0].register_forward_hook(lambda *_: seen.append(em.is_probing()))
    net.eval()
    net(torch.randn(1, 3, 12, 12))
    em.compute_erf(net, torch.randn(2, 3, 12, 12), ["4"])
    assert seen[0] is False and len(seen) > 1 and all(seen[1:])
    assert em.is_probing() is False


# ----------------------------------------------------------------------------- step boundaries
def _train_collecting(watched: bool, skip_probes: bool) -> tuple[dict, list[bool]]:
    """The issue's loop: a forward hook collects activations for a loss term."""
    net = make_net(1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    acts: list[torch.Tensor] = []
    probing: list[bool] = []

    def collect(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        probing.append(em.is_probing())
        if skip_probes and em.is_probing():
            return
        acts.append(out)

    net[2].register_forward_hook(collect)
    torch.manual_seed(3)
    w = em.watch(net, ["4"], every_n_steps=1, optimizer=opt, min_coverage=None) if watched else None
    net.train()
    for x, y in data(4):
        acts.clear()
        opt.zero_grad()
        out = net(x)
        loss = F.cross_entropy(out, y) + 0.1 * acts[0].pow(2).mean()
        loss.backward()
        opt.step()
    if w is not None:
        assert sorted(w.history["4"]) == [0, 1, 2, 3, 4]
        w.remove()
    return net.state_dict(), probing


@pytest.mark.parametrize("skip_probes", [False, True])
def test_activation_collecting_hook_trains_bit_for_bit(skip_probes: bool) -> None:
    plain, calls = _train_collecting(False, skip_probes)
    watched, watched_calls = _train_collecting(True, skip_probes)
    for k in plain:
        assert torch.equal(plain[k], watched[k]), k
    assert calls == [False] * 4
    # The user's hook fires in the probes too (5 probes, at least one forward each), and only
    # there does is_probing() say so.
    assert watched_calls.count(False) == 4 and watched_calls.count(True) >= 5


def test_the_first_probe_runs_at_the_optimizer_step_not_in_the_forward() -> None:
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    w = em.watch(net, ["4"], every_n_steps=10, optimizer=opt, num_samples=2, min_coverage=None)
    (x, y), *_ = data(1)
    F.cross_entropy(net(x), y).backward()
    assert w.history == {} and torch.equal(w.probe_batch, x[:2])  # captured, not probed
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt.step()
    assert sorted(w.history["4"]) == [0]
    # Step 0 saw the parameters before the update: the same map as a probe of them now.
    net.load_state_dict(before)
    again = em.compute_erf(net, x[:2], ["4"])
    assert w.latest is not None
    assert torch.allclose(w.latest["4"].heatmap, again["4"].heatmap, atol=1e-6)
    w.remove()


def test_without_an_optimizer_the_first_probe_is_at_the_first_step() -> None:
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    w = em.watch(net, ["4"], every_n_steps=2, min_coverage=None)
    for x, y in data(4):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        w.step()
    assert sorted(w.history["4"]) == [1, 2, 4]  # no boundary before the first update
    w.remove()


# ----------------------------------------------------------------------------- several monitors
def test_two_watchers_on_one_model_each_probe_on_schedule() -> None:
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    batches = data(6)
    a = em.watch(net, ["4"], every_n_steps=2, optimizer=opt, num_samples=3, min_coverage=None)
    b = em.watch(net, ["0", "4"], every_n_steps=3, optimizer=opt, num_samples=2, min_coverage=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", em.ERFProbeWarning)  # nothing fails, silently or not
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    assert sorted(a.history["4"]) == [0, 2, 4, 6]
    assert sorted(b.history["0"]) == sorted(b.history["4"]) == [0, 3, 6]
    assert torch.equal(a.probe_batch, batches[0][0][:3])
    assert torch.equal(b.probe_batch, batches[0][0][:2])
    assert a.history["4"][0]["trf_size"] == b.history["4"][0]["trf_size"] == 5.0
    a.remove()
    b.remove()
    assert not net._forward_pre_hooks and not net._forward_hooks


def test_a_watcher_beside_compute_erf_captures_and_probes() -> None:
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    batches = data(4)
    w = em.watch(net, ["4"], every_n_steps=2, optimizer=opt, num_samples=3, min_coverage=None)
    other = torch.randn(2, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", em.ERFProbeWarning)
        # Before the first training forward: compute_erf traces and runs the model (the
        # watcher's capture hook fires there, on fx proxies and on the probe's input).
        first = em.compute_erf(net, other, ["0", "4"])
        for i, (x, y) in enumerate(batches):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
            if i == 1:
                em.compute_erf(net, other, ["4"])  # between steps
    assert first["4"].trf is not None and first["4"].trf.size == (5.0, 5.0)
    assert torch.equal(w.probe_batch, batches[0][0][:3])  # the training batch, not `other`
    assert sorted(w.history["4"]) == [0, 2, 4]
    w.remove()


# ----------------------------------------------------------------------------- threads
class _Server:
    """An inference thread: runs ``net`` on the batches it is sent, in eval mode and no_grad,
    and replies with the output or the exception it met (as a serving thread would)."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.requests: queue.Queue[torch.Tensor | None] = queue.Queue()
        self.replies: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while (x := self.requests.get()) is not None:
            try:
                with torch.no_grad():
                    self.replies.put(self.net(x))
            except BaseException as exc:  # StopForward is a BaseException
                self.replies.put(exc)

    def infer(self, x: torch.Tensor) -> Any:
        self.requests.put(x)
        return self.replies.get(timeout=HANG_GUARD_S)

    def stop(self) -> None:
        self.requests.put(None)
        self.thread.join(HANG_GUARD_S)


def _pausing_probes(net: nn.Module, server: _Server, x: torch.Tensor) -> list[tuple[Any, dict]]:
    """A hook on a container (it fires in the TRF trace too) and on a leaf: each time it fires
    inside a probe, another thread runs a whole forward of the model, with every hook of the
    probe registered. Returns the other thread's outputs and the weights they ran with."""
    served: list[tuple[Any, dict]] = []

    def pause(*_: Any) -> None:
        if em.is_probing():  # in this thread only: the server's forwards run this hook too
            weights = {k: v.clone() for k, v in net.state_dict().items()}
            served.append((server.infer(x), weights))

    net.register_forward_pre_hook(pause)  # fires in the TRF trace (a container)
    net[1].register_forward_hook(pause)  # fires in the probe's own forwards
    return served


def _check_served(served: list[tuple[Any, dict]], x: torch.Tensor) -> None:
    assert served
    for out, weights in served:
        assert isinstance(out, torch.Tensor), out  # not an exception
        ref = make_net()
        ref.load_state_dict(weights)
        with torch.no_grad():
            expected = ref.eval()(x)  # the probe holds the model in eval mode meanwhile
        assert torch.allclose(out, expected, atol=1e-6)


def test_an_inference_thread_beside_compute_erf_is_untouched() -> None:
    x, probe = torch.randn(2, 3, 12, 12), torch.randn(3, 3, 12, 12)
    alone = em.compute_erf(make_net(), probe, ["0", "4"])
    net = make_net()
    server = _Server(net)
    served = _pausing_probes(net, server, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", em.ERFProbeWarning)  # e.g. a TRF analysis gone wrong
        res = em.compute_erf(net, probe, ["0", "4"])
    server.stop()
    _check_served(served, x)
    for name in ("0", "4"):
        assert res[name].trf == alone[name].trf
        assert torch.equal(res[name].heatmap, alone[name].heatmap)


def test_an_inference_thread_beside_a_probing_watcher_sees_no_exception() -> None:
    def run(serve: bool) -> tuple[em.Watcher, list[tuple[Any, dict]], dict]:
        net = make_net(2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x = torch.randn(2, 3, 12, 12)
        server = _Server(net) if serve else None
        served = _pausing_probes(net, server, x) if server is not None else []
        w = em.watch(net, ["0", "4"], every_n_steps=1, optimizer=opt, min_coverage=None)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", em.ERFProbeWarning)
            net.train()
            for xb, yb in data(3):
                opt.zero_grad()
                F.cross_entropy(net(xb), yb).backward()
                opt.step()
        w.remove()
        if server is not None:
            server.stop()
            _check_served(served, x)
        return w, served, net.state_dict()

    (quiet, _, plain), (busy, served, trained) = run(False), run(True)
    assert len(served) >= 4  # 4 probes, each paused at least once
    assert busy.history == quiet.history  # every probe on schedule, the same numbers
    for k in plain:
        assert torch.equal(plain[k], trained[k]), k


def test_many_threads_running_forwards_during_probes() -> None:
    # The hostile version: free-running threads, no pauses. The assertions do not depend on
    # how the threads interleave: whatever ran when, nothing may fail anywhere.
    net = make_net()
    net.eval()
    errors: list[BaseException] = []
    stop = threading.Event()
    forwards = [0]

    def serve() -> None:
        x = torch.randn(2, 3, 12, 12)
        while not stop.is_set():
            try:
                with torch.no_grad():
                    assert net(x).shape == (2, 4)
                forwards[0] += 1
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=serve, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", em.ERFProbeWarning)
            for i in range(4):
                res = em.compute_erf(net, torch.randn(2, 3, 12 + 2 * i, 12), ["0", "4"])
                assert res["4"].trf is not None and res["4"].trf.size == (5.0, 5.0)
    finally:
        stop.set()
        for t in threads:
            t.join(HANG_GUARD_S)
    assert not errors, errors
    assert forwards[0] > 0


def test_probes_of_two_threads_take_turns() -> None:
    # Each probe saves and restores the module flags and buffers. Thread B's probe starting
    # inside thread A's would save A's eval-mode flags and restore them last: the model would
    # be left in eval mode. B waits for A instead.
    net = make_net()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 12, 12)
    b_inside, a_done = threading.Event(), threading.Event()
    main, started, results, errors = threading.get_ident(), [], [], []

    def run_b() -> None:
        try:
            results.append(em.compute_erf(net, x, ["4"]))
        except BaseException as exc:
            errors.append(exc)

    b = threading.Thread(target=run_b, daemon=True)

    def pause(*_: Any) -> None:
        if not em.is_probing():
            return
        if threading.get_ident() == main:
            if not started:
                started.append(b.start())
                b_inside.wait(timeout=2)  # B may not get inside: it must wait for A's end
        else:
            b_inside.set()
            a_done.wait(HANG_GUARD_S)

    net[1].register_forward_hook(pause)
    res_a = em.compute_erf(net, x, ["4"])
    a_done.set()
    b.join(HANG_GUARD_S)
    assert not errors, errors
    assert all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(results[0]["4"].heatmap, res_a["4"].heatmap)


# ----------------------------------------------------------------------------- NaN first batch
class _Clean(nn.Module):
    """Models that mask invalid pixels themselves train on batches with NaN values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def test_a_nan_first_batch_is_passed_over_for_the_next(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(_Clean(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    batches = data(6, nan_first=True)
    batches[1][0][3, 0, 0, 0] = float("inf")  # the second one too (in the 4 images taken)
    batches[2][0][4, 0, 0, 0] = float("nan")  # (not among the 4 images taken)
    w = em.watch(net, ["3"], every_n_steps=2, optimizer=opt, num_samples=4, min_coverage=None)
    caplog.set_level("INFO", logger="erf_monitor")
    with pytest.warns(em.ERFProbeWarning, match="NaN or Inf") as record:
        for x, _ in batches:
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    assert len(record) == 1, [str(r.message) for r in record]  # said once, not per batch
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert torch.equal(w.probe_batch, batches[2][0][:4])
    assert sorted(w.history["3"]) == [2, 4, 6]  # at the first boundary after the capture
    w.remove()
    assert not net._forward_pre_hooks


# ----------------------------------------------------------------------------- Lightning
def _lightning_module(net: nn.Module, batches: list[torch.Tensor], watch: bool) -> Any:
    L = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader

    class Module(L.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.watcher: em.Watcher | None = None

        def on_fit_start(self) -> None:
            if watch:  # a watch() of its own beside the Trainer's ERFMonitor
                self.watcher = em.watch(self.net, ["3"], every_n_steps=2, num_samples=2,
                                        min_coverage=None, summary=False)  # fmt: skip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: torch.Tensor, _: int) -> torch.Tensor:
            return self(batch).pow(2).mean()

        def on_train_batch_end(self, *_: Any) -> None:
            if self.watcher is not None:
                self.watcher.step()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(batches, batch_size=None)  # the batches, in order

    return Module()


def _fit(module: Any, monitor: em.ERFMonitor, tmp_path: Any) -> None:
    L = pytest.importorskip("lightning.pytorch")
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
        callbacks=[monitor],
    )  # fmt: skip
    trainer.fit(module)


def _clean_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(_Clean(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3))


def test_lightning_takes_the_batch_after_a_nan_first_batch(tmp_path: Any) -> None:
    batches = [x for x, _ in data(4, nan_first=True)]
    monitor = em.ERFMonitor(["net.3"], every_n_steps=2, num_samples=4, min_coverage=None,
                            summary=False)  # fmt: skip
    with pytest.warns(em.ERFProbeWarning, match="NaN or Inf") as record:
        _fit(_lightning_module(_clean_net(), batches, watch=False), monitor, tmp_path)
    ours = [str(r.message) for r in record if issubclass(r.category, em.ERFProbeWarning)]
    assert len(ours) == 1, ours
    assert torch.equal(monitor.probe_batch, batches[1][:4])
    assert sorted(monitor.history["net.3"]) == [1, 2, 4]  # the next step boundary, then on


def test_lightning_monitor_and_a_watcher_on_one_model_both_probe(tmp_path: Any) -> None:
    batches = [x for x, _ in data(4)]
    module = _lightning_module(_clean_net(), batches, watch=True)
    monitor = em.ERFMonitor(["net.3"], every_n_steps=2, num_samples=3, min_coverage=None,
                            summary=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", em.ERFProbeWarning)
        _fit(module, monitor, tmp_path)
    watcher = module.watcher
    assert sorted(monitor.history["net.3"]) == [0, 2, 4]
    # The monitor's fit-start probe traced and ran the model before the first training
    # forward: the watcher still took the training batch, and probes from its first step()
    # (no optimizer: no boundary before the first update).
    assert torch.equal(watcher.probe_batch, batches[0][:2])
    assert sorted(watcher.history["3"]) == [1, 2, 4]
    assert watcher.history["3"][2]["trf_size"] == monitor.history["net.3"][2]["trf_size"] == 5.0
    watcher.remove()


# ----------------------------------------------------------------------------- HF Trainer
class _Stream(torch.utils.data.IterableDataset):
    """Batches in a known order (no sampler): the first one has a NaN pixel."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __iter__(self) -> Any:
        return iter({"pixel_values": x, "labels": torch.tensor(0)} for x in self.images)


class _HFNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _clean_net()

    def forward(self, pixel_values: torch.Tensor, labels: Any = None) -> dict[str, torch.Tensor]:
        return {"loss": self.net(pixel_values).pow(2).mean()}


def test_hf_trainer_takes_the_batch_after_a_nan_first_batch(tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    images = torch.cat([x[:4] for x, _ in data(4, nan_first=True)])  # batches of 4, in order
    cb = em.ERFTrainerCallback(["net.3"], every_n_steps=2, num_samples=4, min_coverage=None,
                               summary=False)  # fmt: skip
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=_HFNet(), args=args, train_dataset=_Stream(images), callbacks=[cb]
    )
    with pytest.warns(em.ERFProbeWarning, match="NaN or Inf") as record:
        trainer.train()
    ours = [str(r.message) for r in record if issubclass(r.category, em.ERFProbeWarning)]
    assert len(ours) == 1, ours
    assert torch.equal(cb.probe_batch, images[4:8])  # the second batch
    # Copied in step 2's forward (the first batch, at step 1, still had the NaN): probed at
    # that step's end, then on schedule.
    assert sorted(cb.history["net.3"]) == [2, 4]
    assert not trainer.model._forward_pre_hooks


def test_lightning_activation_collecting_hook_trains_bit_for_bit(tmp_path: Any) -> None:
    L = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader

    batches = [x for x, _ in data(4)]

    class Module(L.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net(1)
            self.acts: list[torch.Tensor] = []
            self.net[2].register_forward_hook(lambda _m, _i, out: self.acts.append(out))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: torch.Tensor, _: int) -> torch.Tensor:
            self.acts.clear()
            out = self(batch)  # the hook pattern of the issue, without is_probing()
            return out.pow(2).mean() + 0.1 * self.acts[0].pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(batches, batch_size=None)

    def fit(monitor: em.ERFMonitor | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        module = Module()
        trainer = L.Trainer(
            max_steps=4, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False,
            default_root_dir=str(tmp_path), callbacks=[] if monitor is None else [monitor],
        )  # fmt: skip
        trainer.fit(module)
        return module.state_dict()

    monitor = em.ERFMonitor(["net.4"], every_n_steps=1, min_coverage=None, summary=False)
    plain, watched = fit(None), fit(monitor)
    assert sorted(monitor.history["net.4"]) == [0, 1, 2, 3, 4]
    for k in plain:
        assert torch.equal(plain[k], watched[k]), k
