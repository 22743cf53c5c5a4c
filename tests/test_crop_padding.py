"""Cropping models whose padding depends on the input size (issue 25, item 4).

timm's ``Conv2dSame`` pads TensorFlow's "SAME" way: ``max((ceil(i / s) - 1) s + k - i, 0)``
in total, the smaller half on the left, so the left padding depends on the parity of the
input size ``i``. A crop whose size has another parity than the input was padded otherwise:
its units sat one pixel off (maps 10% outside their TRF, or the fallback to a full probe).
References: float64 copies, the full input, one image at a time (``tests/references.py``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import erf_monitor as em
from erf_monitor.probe.plan import cached_plan
from references import one_layer_reference

timm_layers = pytest.importorskip("timm.layers")


def _same_stack(k: int) -> nn.Module:
    Same = timm_layers.Conv2dSame
    return nn.Sequential(
        Same(3, 8, k, stride=2), nn.ReLU(), Same(8, 8, k, stride=2), nn.ReLU(),
        Same(8, 8, 3, stride=2), Same(8, 8, 3),
    )  # fmt: skip


@pytest.mark.parametrize(("px", "k"), [(64, 5), (66, 5), (67, 4), (70, 3)])
def test_conv2d_same_stacks_crop_exactly(px: int, k: int) -> None:
    torch.manual_seed(0)
    net = _same_stack(k).eval()
    x = torch.randn(2, 3, px, px)
    layers = ["0", "2", "4", "5"]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = em.compute_erf(net, x, layers, crop=True)
    assert not [str(w.message) for w in rec], [str(w.message) for w in rec]
    plan = cached_plan(net, x, layers=layers, crop=True)
    cropped = {n for g in plan.groups if g.window is not None for n in g.layers}
    assert cropped == set(layers)  # every layer really ran on a crop
    ref = copy.deepcopy(net).double()
    for name in layers:
        expected = one_layer_reference(ref, x.double(), name)
        err = float((res[name].heatmap.double() - expected).abs().max() / expected.max())
        assert err < 1e-5, (name, err)  # was 1 px off (0.11 of the mass outside the TRF)
        assert res[name].trf is not None
