"""``em.watch`` in plain PyTorch loops: optimizer hook, manual steps, context manager, cleanup."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import erf_monitor as em
from erf_monitor.sinks._tensorboard import tb_tag


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def data(n_batches: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 4, (6,), generator=g))
        for _ in range(n_batches)
    ]


def train(net: nn.Module, opt: torch.optim.Optimizer, batches: list, step_fn=None) -> None:
    net.train()
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        if step_fn is not None:
            step_fn()


def no_hooks_left(net: nn.Module, opt: torch.optim.Optimizer) -> bool:
    modules_clean = all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in net.modules()
    )
    return modules_clean and not opt._optimizer_step_post_hooks


def test_optimizer_hook_counts_steps_and_captures_first_batch(tmp_path: Path) -> None:
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    batches = data(5)
    w = em.watch(
        net,
        ["4"],
        every_n_steps=2,
        logger=str(tmp_path),
        optimizer=opt,
        num_samples=4,
        min_coverage=None,
    )
    train(net, opt, batches)
    assert w.global_step == 5
    assert sorted(w.history["4"]) == [0, 2, 4]  # step 0 probed before the first update
    assert w.probe_batch is not None and torch.equal(w.probe_batch, batches[0][0][:4])
    w.close()  # final probe at step 5, then cleanup
    assert sorted(w.history["4"]) == [0, 2, 4, 5]
    assert no_hooks_left(net, opt)
    rows = (tmp_path / "metrics.csv").read_text()
    assert "5,erf/4/coverage," in rows and "0,erf/probe_time_s," in rows


def test_manual_step_and_tensor_inputs() -> None:
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    probe = torch.randn(3, 3, 16, 16)
    w = em.watch(net, ["0", "4"], every_n_steps=3, probe_inputs=probe, min_coverage=None)
    results = []
    for x, y in data(6) + data(1):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        results.append(w.step())
    assert [r is not None for r in results] == [False, False, True, False, False, True, False]
    assert sorted(w.history["0"]) == [3, 6]
    assert w.latest is not None and w.latest["4"].num_samples == 3
    w.remove()
    assert no_hooks_left(net, opt)


def test_context_manager_leaves_no_hook_even_on_error() -> None:
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with em.watch(net, "auto", every_n_steps=1, optimizer=opt, min_coverage=None) as w:
        train(net, opt, data(2))
    assert w.layers is not None and len(w.layers) == 2
    assert sorted(w.history[w.layers[-1]]) == [0, 1, 2]
    assert no_hooks_left(net, opt)

    net2 = make_net()
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="boom"), em.watch(net2, ["4"], optimizer=opt2):
        raise RuntimeError("boom")  # before any forward: the capture hook is still there
    assert no_hooks_left(net2, opt2)


def test_training_is_bit_for_bit_identical() -> None:
    def run(watched: bool) -> tuple[dict, dict, torch.Tensor]:
        net = make_net(1)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        torch.manual_seed(3)
        if watched:
            with (
                em.watch(net, "auto", every_n_steps=1, optimizer=opt, min_coverage=0.9),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore", em.ERFCoverageWarning)
                train(net, opt, data(4))
        else:
            train(net, opt, data(4))
        return net.state_dict(), opt.state_dict()["state"], torch.get_rng_state()

    (a, oa, ra), (b, ob, rb) = run(False), run(True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), (i, k)
    assert torch.equal(ra, rb)


def test_summary_writer_and_stop(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.warns(em.ERFCoverageWarning, match="covers only"):
        w = em.watch(
            net,
            ["4"],
            every_n_steps=2,
            logger=writer,
            optimizer=opt,
            min_coverage=0.9,
            on_insufficient="stop",
        )
        train(net, opt, data(2))
    assert w.should_stop and w.alerts == {"4": 0}
    w.close()
    writer.close()
    ea = EventAccumulator(str(tmp_path / "erf"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars(tb_tag("erf/4/coverage"))] == [0, 2]
    assert len(ea.Images(tb_tag("erf/4/heatmap"))) == 2


def test_raise_on_insufficient_from_step() -> None:
    net = make_net()
    w = em.watch(
        net,
        ["0"],
        every_n_steps=1,
        probe_inputs=torch.randn(2, 3, 16, 16),
        min_coverage=0.5,
        on_insufficient="raise",
    )
    with pytest.raises(em.ERFCoverageWarning, match="covers only"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w.step()
    w.remove()


def test_state_dict_roundtrip() -> None:
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    w = em.watch(net, ["4"], every_n_steps=1, optimizer=opt, min_coverage=None)
    train(net, opt, data(2))
    w.remove()
    buf = io.BytesIO()
    torch.save(w.state_dict(), buf)
    buf.seek(0)
    w2 = em.watch(net, ["4"], every_n_steps=1, optimizer=opt, min_coverage=None)
    w2.load_state_dict(torch.load(buf, weights_only=True))
    assert w2.global_step == 2 and w2.history == w.history
    assert w2.probe_batch is not None and torch.equal(w2.probe_batch, w.probe_batch)
    assert not net._forward_pre_hooks  # the batch is known: no capture hook any more
    train(net, opt, data(1))
    assert sorted(w2.history["4"]) == [0, 1, 2, 3]
    w2.remove()
    assert no_hooks_left(net, opt)
    w3 = em.watch(net, ["4"], every_n_steps=1, optimizer=opt, min_coverage=None)
    with pytest.warns(em.ERFProbeWarning, match="state version 9, this one reads up to 1"):
        w3.load_state_dict({**w.state_dict(), "version": 9})  # a newer library's state
    assert w3.global_step == 0 and w3.history == {} and w3.probe_batch is None
    train(net, opt, data(1))  # afresh: the first batch is captured and probed
    assert sorted(w3.history["4"]) == [0, 1]
    w3.remove()


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module"):
        em.watch("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown layer"):
        em.watch(make_net(), ["nope"])
    with pytest.raises(ValueError, match="validation"):
        em.watch(make_net(), probe_inputs="val")
    with pytest.raises(TypeError, match="Cannot log"):
        em.watch(make_net(), ["4"], logger=3.5)
