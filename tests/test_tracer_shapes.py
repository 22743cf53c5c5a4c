"""The tracer's shapes-only leaf modules (``trf.tracer.output_like``).

While it traces, the tracer does not compute linear, convolution, normalisation and
activation layers on the values the input feeds: it returns a tensor of the output's shape.
Checked here against the real modules:

* over generated configurations (kernels, strides, paddings and padding modes, dilations,
  groups, input sizes too small for the kernel, wrong channels, features or dtypes): the
  stand-in has the real output's shape and dtype, and wherever the real call fails there is
  no stand-in (the real module runs and raises its own error);
* over the whole model zoo: the graph traced with stand-ins is the graph traced with every
  module computed (same ops, targets, arguments and shapes), and so is the layer index.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from erf_monitor.trf import tracer
from erf_monitor.trf.tracer import Unsupported, output_like, trace_model
from zoo import ZOO, Entry

# ----------------------------------------------------------------------------- modules


def _real(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    try:
        with torch.no_grad():
            return module(x)
    except (RuntimeError, ValueError):
        return None


def _check(module: nn.Module, x: torch.Tensor, *, expect_fast: bool) -> None:
    module.eval()
    real = _real(module, x)
    got = output_like(module, (x,), {})
    if real is None:
        assert got is None, f"{module} on {tuple(x.shape)} fails for real but got a stand-in"
        return
    if expect_fast:
        assert got is not None, f"no stand-in for {module} on {tuple(x.shape)}"
    if got is not None:
        assert got.shape == real.shape, (module, tuple(x.shape))
        assert got.dtype == real.dtype and got.device == real.device
        assert got.is_contiguous()


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    nd=st.sampled_from([1, 2, 3]),
    c_in=st.integers(1, 6),
    c_out=st.integers(1, 6),
    kernel=st.integers(1, 5),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 3),
    padding=st.one_of(st.integers(0, 4), st.sampled_from(["same", "valid"])),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    size=st.integers(1, 9),
    groups=st.sampled_from([1, "depthwise"]),
    wrong_channels=st.booleans(),
)
def test_convolution_stand_in_matches_real(
    nd: int,
    c_in: int,
    c_out: int,
    kernel: int,
    stride: int,
    dilation: int,
    padding: Any,
    mode: str,
    size: int,
    groups: Any,
    wrong_channels: bool,
) -> None:
    conv_type = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    g = c_in if groups == "depthwise" else 1
    if g > 1:
        c_out = c_in * max(1, c_out // c_in)
    if padding == "same" and stride > 1:
        stride = 1  # torch refuses 'same' with strides
    conv = conv_type(
        c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation,
        groups=g, padding_mode=mode,
    )  # fmt: skip
    channels = c_in + 1 if wrong_channels else c_in
    x = torch.randn(2, channels, *([size] * nd))
    _check(conv, x, expect_fast=False)


def test_convolution_stand_in_is_used_where_it_can_be() -> None:
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    _check(conv, torch.randn(1, 3, 15, 16), expect_fast=True)
    circ = nn.Conv2d(3, 4, 5, padding=2, padding_mode="circular")
    _check(circ, torch.randn(1, 3, 9, 9), expect_fast=True)
    same = nn.Conv1d(2, 2, 4, padding="same", dilation=2)
    _check(same, torch.randn(1, 2, 11), expect_fast=True)


@pytest.mark.parametrize("seed", range(40))
def test_linear_norm_and_activation_stand_ins_match_real(seed: int) -> None:
    rng = random.Random(seed)
    c = rng.randint(1, 6)
    spatial = [rng.randint(1, 5) for _ in range(rng.randint(0, 2))]
    x = torch.randn(2, c, *spatial)
    off = rng.choice([0, 0, 1])  # sometimes the wrong size: the real call fails
    modules: list[tuple[nn.Module, torch.Tensor]] = [
        (nn.Linear(x.shape[-1] + off, rng.randint(1, 7)), x),
        (nn.LayerNorm(x.shape[-1] + off), x),
        (nn.LayerNorm([*x.shape[-2:]]), x),
        (nn.GroupNorm(1, c + off), x),
        (nn.BatchNorm1d(c + off), x.flatten(2) if x.ndim > 3 else x),
        (nn.BatchNorm2d(c + off), x),
        (nn.BatchNorm3d(c + off), x),
        (nn.GELU(), x),
        (nn.ReLU(inplace=True), x.clone()),
        (nn.Hardswish(), x),
        (nn.Dropout(0.5), x),
        (nn.Identity(), x),
    ]
    for module, inp in modules:
        _check(module, inp, expect_fast=off == 0 and not isinstance(module, nn.BatchNorm3d))


def test_no_stand_in_for_what_the_real_call_decides() -> None:
    lin = nn.Linear(4, 3)
    assert output_like(lin, (torch.randn(2, 4, dtype=torch.float64),), {}) is None  # dtypes
    assert output_like(lin, (torch.randn(2, 4),), {"extra": 1}) is None
    assert output_like(lin, (torch.randint(0, 3, (2, 4)),), {}) is None  # integers
    bn = nn.BatchNorm2d(3).train()
    assert output_like(bn, (torch.randn(2, 3, 4, 4),), {}) is None  # batch statistics
    untracked = nn.BatchNorm1d(3, track_running_stats=False).eval()
    assert output_like(untracked, (torch.randn(1, 3),), {}) is None  # fails on one sample
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert output_like(lin, (torch.randn(2, 4),), {}) is None  # autocast picks the dtype

    class MyLinear(nn.Linear):  # a subclass may change forward: run it
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[..., :1]

    assert output_like(MyLinear(4, 3), (torch.randn(2, 4),), {}) is None


# ----------------------------------------------------------------------------- models


def _signature(traced: tracer.TracedModel) -> list[tuple[Any, ...]]:
    def arg(a: Any) -> Any:
        return f"%{a.name}" if isinstance(a, fx.Node) else repr(a)

    rows = []
    for node in traced.gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        shape = tuple(meta.shape) if hasattr(meta, "shape") else None
        args = fx.node.map_aggregate(node.args, arg)
        kwargs = fx.node.map_aggregate(node.kwargs, arg)
        rows.append((node.name, node.op, str(node.target), repr(args), repr(kwargs), shape))
    return rows


def _trace(model: nn.Module, entry: Entry) -> tuple[Any, Any]:
    try:
        traced = trace_model(model, None, (3, entry.size, entry.size))
    except Unsupported as exc:
        return "unsupported", str(exc)
    outputs = {k: (v.name if v is not None else None) for k, v in traced.outputs.items()}
    return _signature(traced), (outputs, sorted(traced.leaf_paths))


@pytest.mark.parametrize("entry", [e for e in ZOO if e.available], ids=lambda e: e.name)
def test_zoo_graphs_are_the_same_with_stand_ins(
    entry: Entry, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = entry.build().eval()
    fast = _trace(model, entry)
    monkeypatch.setattr(tracer, "output_like", lambda *_a: None)
    slow = _trace(model, entry)
    assert fast == slow
