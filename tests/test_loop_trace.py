"""A Python loop over tokens in a model's forward (issue 25, item 4).

The fx trace records every op the input's values feed, so a selective scan written as a loop
over the ``L`` tokens unrolled into ``L`` copies of its body (16 s for a call that the loop
itself runs in 0.4 s). The trace now stops once one op of one module has run
``MAX_REPEATS`` times, and the numeric method measures the field instead.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import erf_monitor as em
from erf_monitor.trf.tracer import MAX_REPEATS, Unsupported, trace_model


class Scan(nn.Module):
    """A causal scan over the tokens of a map, written as a Python loop."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Linear(c, c)
        self.b = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (N, L, C), row-major tokens
        decay, gate = torch.sigmoid(self.a(t)), self.b(t)
        state = torch.zeros_like(t[:, 0])
        out = []
        for i in range(t.shape[1]):
            state = decay[:, i] * state + gate[:, i]
            out.append(state)
        return torch.stack(out, 1).transpose(1, 2).reshape(n, c, h, w)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 4, stride=4), Scan(4), nn.Conv2d(4, 4, 3, padding=1)
    ).eval()


def test_a_loop_over_tokens_stops_the_trace_and_says_why() -> None:
    net = _net()
    # 8 x 8 = 64 tokens: traced as before (the body's two getitems run 128 times) ...
    assert MAX_REPEATS == 256
    traced = trace_model(net, None, (3, 32, 32))
    assert len(traced.gm.graph.nodes) > 4 * 64
    # ... 17 x 17 = 289: refused once an op repeats a 257th time, naming the module.
    with pytest.raises(Unsupported, match=r"ran more than 256 times in module '1'.*loop"):
        trace_model(net, None, (3, 68, 68))


def test_the_scan_model_gets_its_field_from_the_numeric_method(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = _net()
    with warnings.catch_warnings(record=True) as rec, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        trf = em.theoretical_rf(net, (3, 68, 68), ["2"])["2"]
    said = [str(w.message) for w in rec] + [r.getMessage() for r in caplog.records]
    assert any("numeric" in m and "loop" in m for m in said), said
    assert len([m for m in said if "loop" in m]) == 1 and "\n" not in said[0]
    # By hand: 17 x 17 tokens of 4 px; the centre token (8, 8) of the last conv reads tokens
    # (7..9, 7..9), and the causal scan token k reads tokens 0..k in row-major order: rows
    # 0..9 (pixels 0..39), every column (row 0 is read whole).
    assert trf.method == "numeric"
    assert trf.clipped == ((0, 39), (0, 67))
    res = em.compute_erf(net, torch.randn(2, 3, 68, 68), ["2"], trf={"2": trf})
    heat = res["2"].heatmap
    assert not bool(heat[40:].any()) and bool(heat[39].any()) and bool(heat[0].any())
