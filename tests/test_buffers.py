"""Buffers a forward changes in any mode are put back: quantization-aware training's observers,
counters, running maxima, buffers replaced by new tensors.

Before, only train-mode probes restored buffers: a QAT model's ``FakeQuantize`` observers
widened their ranges on the probe batch (scale 0.0088 -> 0.0096), so the watched run trained
differently; ``theoretical_rf`` incremented a counter buffer while tracing.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn

import erf_monitor as em


class Counter(nn.Module):
    """Counts calls in place and keeps a running maximum by replacing its buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("peak", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.peak = torch.maximum(self.peak, x.detach().abs().max())
        return x


def qat_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        tq.FakeQuantize(),
        nn.Conv2d(3, 8, 3, padding=1),
        Counter(),
        nn.ReLU(),
        tq.FakeQuantize(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("train_mode", [False, True])
def test_probe_and_trf_leave_every_buffer_as_it_was(train_mode: bool) -> None:
    net = qat_net().train()
    net(torch.randn(4, 3, 16, 16))  # observers and counters hold something
    before = snapshot(net)
    objects = [id(b) for b in net.buffers()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.ERFProbeWarning)  # FakeQuantize is not traceable
        em.compute_erf(net, 10 * torch.randn(4, 3, 16, 16), ["5"], train_mode=train_mode)
        em.theoretical_rf(net, (3, 16, 16), ["5"])
        em.compute_erf(net, torch.randn(2, 3, 16, 16), ["5"], trf="skip")
    assert_same(before, net.state_dict())
    assert [id(b) for b in net.buffers()] == objects  # the same tensors, not copies


def test_tracing_a_module_that_counts_in_place_leaves_it() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), Counter(), nn.Conv2d(2, 2, 3))
    trf = em.theoretical_rf(net, (1, 16, 16), ["2"])["2"]
    assert trf.size == (5.0, 5.0)
    assert float(net[1].calls) == 0.0


def test_qat_training_is_bit_for_bit_identical_with_watch() -> None:
    g = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 4, (6,), generator=g))
        for _ in range(4)
    ]

    def run(watched: bool) -> dict[str, torch.Tensor]:
        net = qat_net(1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        probe = 5 * torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(9))
        watcher = (
            em.watch(
                net,
                ["5"],
                every_n_steps=1,
                optimizer=opt,
                probe_inputs=probe,
                min_coverage=None,
                summary=False,
            )
            if watched
            else None
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", em.ERFProbeWarning)
            net.train()
            for x, y in batches:
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
        if watcher is not None:
            assert len(watcher.history["5"]) >= 3  # it did probe
            watcher.close()
        return snapshot(net)

    assert_same(run(False), copy.deepcopy(run(True)))


def test_auto_layers_trace_and_probe_leave_every_training_flag() -> None:
    # ``"auto"`` reads the outputs in eval mode, the TRF trace runs in eval mode and the probe
    # in its own mode: each puts back every module's flag, a frozen part's included.
    from erf_monitor.targets.auto import pick_layers
    from erf_monitor.trf.tracer import trace_model

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(), nn.ReLU(), nn.Conv2d(4, 4, 3)).train()
    net[1].eval()
    flags = [m.training for m in net.modules()]
    x = torch.randn(2, 3, 12, 12)
    for run in (
        lambda: pick_layers(net, x),
        lambda: trace_model(net, None, (3, 12, 12)),
        lambda: em.compute_erf(net, x, "auto"),
    ):
        run()
        assert [m.training for m in net.modules()] == flags == [True, True, False, True, True]


def test_training_flags_are_put_back_when_the_block_raises() -> None:
    from erf_monitor.core.buffers import preserved_training

    net = nn.Sequential(nn.Dropout(), nn.Dropout().eval()).train()
    net[1].eval()
    with pytest.raises(RuntimeError), preserved_training(net):
        net.eval()
        raise RuntimeError
    assert [m.training for m in net.modules()] == [True, True, False]
