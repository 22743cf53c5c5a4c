"""A Python loop in the forward: the TRF trace stops at a bound instead of unrolling it.

Issue 25: a selective scan written as a loop over its tokens made the fx trace record every
op of every token (56 forwards of the model at 224 px). With ``method="auto"`` the trace now
stops once one op of one module repeats past a bound; the layers it reached keep their exact
fx TRFs, the others have none (as with ``trf="skip"``), and one warning names the loop.
``method="fx"`` and ``method="numeric"`` still analyse the whole model. Nothing here times
anything: the trace's length is counted in recorded ops.
"""

from __future__ import annotations

import importlib.util
import operator
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import erf_monitor as em
from erf_monitor.trf.analysis import trace_layers
from erf_monitor.trf.tracer import LOOP_BOUND, Unrolled, full_trace
from references import one_layer_reference


def _bench_module() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loop_trace.py"
    spec = importlib.util.spec_from_file_location("bench_loop_trace", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The Mamba-style scan of benchmarks/bench_loop_trace.py (a Python loop over the tokens).
Scan = _bench_module().Scan


def scan_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 4, stride=4), Scan(4, 2), nn.Conv2d(4, 4, 3, padding=1)
    ).eval()


def loop_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "loop" in str(w.message)]


def test_the_scan_gets_one_line_and_no_trf_after_the_loop() -> None:
    model = scan_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trfs = em.theoretical_rf(model, (3, 64, 64), ["0", "1", "2"])
    (text,) = loop_warnings(caught)
    assert "\n" not in text
    assert "'1' (Scan)" in text and "getitem" in text  # the op that repeats, and where
    assert "method='fx'" in text and "method='numeric'" in text  # how to get the rest
    assert [w.category for w in caught if str(w.message) == text] == [em.ERFProbeWarning]
    # The patch convolution before the loop: its exact fx TRF; the scan and after: unknown.
    assert list(trfs) == ["0"]
    patch = trfs["0"]
    assert patch.method == "fx" and patch.local
    assert patch.size == (4.0, 4.0) and patch.stride == (4.0, 4.0)
    assert patch.interval == ((32, 35), (32, 35))  # the centre unit 8 of 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about before the loop
        assert em.theoretical_rf(scan_model(), (3, 64, 64), ["0"]) == trfs


def test_the_trace_stops_at_the_bound() -> None:
    # Counted in recorded ops: the scan's 3 indexings per token stop at the bound, where
    # the whole trace records every token's.
    net = scan_model()
    with pytest.raises(Unrolled) as info:
        trace_layers(net, (3, 64, 64), ["2"])
    partial = info.value.traced.gm.graph
    with full_trace():
        full = trace_layers(net, (3, 64, 64), ["2"]).gm.graph
    tokens = 16 * 16

    def getitems(graph: torch.fx.Graph) -> int:
        return sum(n.op == "call_function" and n.target is operator.getitem for n in graph.nodes)

    scan_modules = len(list(net[1].modules()))
    assert getitems(partial) == LOOP_BOUND + scan_modules  # then the next one stopped it
    assert getitems(full) >= 3 * tokens
    assert len(partial.nodes) < len(full.nodes) / 5
    # The conv before the loop was recorded; the scan never returned.
    assert "0" in info.value.traced.outputs and "1" not in info.value.traced.outputs
    assert info.value.site.startswith("getitem in '1' (Scan)")


def test_compute_erf_of_the_scan_is_the_skip_probe_and_the_plain_map() -> None:
    model = scan_model()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = em.compute_erf(model, x, ["0", "1"])
    assert len(loop_warnings(caught)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skip = em.compute_erf(model, x, ["0", "1"], trf="skip")
    assert auto["1"].trf is None and skip["1"].trf is None
    assert torch.equal(auto["1"].heatmap, skip["1"].heatmap)  # the full input, both
    assert auto["1"].centre == skip["1"].centre
    assert auto["0"].trf is not None and auto["0"].trf.size == (4.0, 4.0)
    torch.testing.assert_close(auto["0"].heatmap, skip["0"].heatmap, rtol=1e-6, atol=0)
    for name in ("0", "1"):
        plain = one_layer_reference(model, x, name)
        torch.testing.assert_close(auto[name].heatmap, plain, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("method", ["fx", "numeric"])
def test_explicit_methods_analyse_the_whole_loop(method: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trfs = em.theoretical_rf(scan_model(), (3, 32, 32), ["0", "1", "2"], method=method)
    assert loop_warnings(caught) == []
    assert list(trfs) == ["0", "1", "2"] and {t.method for t in trfs.values()} == {method}
    # Token i of the causal scan sees tokens 0..i (raster order): the rows up to its own.
    scan = trfs["1"]
    assert scan.clipped == ((0, 19), (0, 31))  # centre token (4, 4) of 8 x 8, 4 px patches
    assert not scan.local


class Blocks(nn.Module):
    """Short legitimate loops: residual blocks called in a for-loop over a ModuleList, and
    one weight-tied block applied ``repeats`` times."""

    def __init__(self, depth: int, repeats: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(depth))
        self.tied = nn.Conv2d(4, 4, 3, padding=1)
        self.repeats = repeats
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + torch.relu(block(x))
        for _ in range(self.repeats):
            x = x + self.tied(x)
        return self.head(x)


@pytest.mark.parametrize(("depth", "repeats"), [(4, 4), (LOOP_BOUND + 16, 4), (2, 12)])
def test_short_loops_are_traced_whole(depth: int, repeats: int) -> None:
    # A loop over a ModuleList repeats its ops once per module (deeper than the bound here
    # too: the bound grows with the looping module's size); a tied block a few times.
    model = Blocks(depth, repeats).eval()
    size = 2 * (1 + depth + repeats) + 9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trfs = em.theoretical_rf(model, (3, size, size), ["head"])
    assert trfs["head"].method == "fx"
    side = 2 * (1 + depth + repeats) + 1  # 3 x 3 convolutions, stride 1
    assert trfs["head"].size == (side, side)
