"""Model-zoo conformance: ``layers="auto"``, the probe and the TRF on every model users bring.

For each model of ``tests/zoo.py`` (random init, small inputs): ``compute_erf(..., "auto")``
and ``theoretical_rf`` run; every map is finite, non-negative and of the input's shape; its
support lies inside every finite TRF (checked here, index by index); the picks are the layers
checked by eye below, never a LayerNorm, and in the order in which their modules finish in
the forward (recorded here with hooks of our own). The same stages named explicitly (no
layout given) give the same TRFs and maps. ``docs/scripts/make_zoo_table.py`` turns
the same zoo into the table of ``docs/models.md``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import erf_monitor as em
from erf_monitor.targets.auto import pick_layers
from erf_monitor.targets.layers import locate_layer
from zoo import ZOO, Entry, make_input

#: The picks, checked by eye (docs/models.md explains the rule behind each family).
EXPECTED: dict[str, list[str]] = {
    "alexnet": ["features.1", "features.4", "features.11"],
    "convnext_tiny": ["features.1", "features.3", "features.5", "features"],
    "densenet121": [
        "features.relu0", "features.denseblock1", "features.denseblock2",
        "features.denseblock3", "features",
    ],
    "efficientnet_b0": ["features.1", "features.2", "features.3", "features.5", "features"],
    "efficientnet_v2_s": ["features.1", "features.2", "features.3", "features.5", "features"],
    "googlenet": ["conv1", "conv3", "inception3b", "inception4e", "inception5b"],
    "inception_v3": [
        "Conv2d_1a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "Mixed_5d",
        "Mixed_6e",
    ],
    "maxvit_t": ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3"],
    "mnasnet0_5": ["layers.7", "layers.8", "layers.9", "layers.11", "layers"],
    "mobilenet_v2": ["features.1", "features.3", "features.6", "features.13", "features"],
    "mobilenet_v3_small": ["features.0", "features.1", "features.3", "features.8", "features"],
    "regnet_y_400mf": [
        "stem", "trunk_output.block1", "trunk_output.block2", "trunk_output.block3",
        "trunk_output",
    ],
    "torchvision:resnet18": ["relu", "layer1", "layer2", "layer3", "layer4"],
    "resnext50_32x4d": ["relu", "layer1", "layer2", "layer3", "layer4"],
    "shufflenet_v2_x0_5": ["conv1", "maxpool", "stage2", "stage3", "conv5"],
    "squeezenet1_0": ["features.1", "features.5", "features.10", "classifier.2"],
    "swin_t": ["features.1", "features.3", "features.5", "features"],
    "swin_v2_t": ["features.1", "features.3", "features.5", "features"],
    "vgg11": [
        "features.1", "features.4", "features.9", "features.14", "features.19", "features",
    ],
    "vit_b_16": ["encoder.layers"],
    "fasterrcnn_resnet50_fpn": [
        "backbone.body.relu", "backbone['0']", "backbone['1']", "backbone['2']",
        "backbone['3']",
    ],
    "retinanet_resnet50_fpn": [
        "backbone.body.relu", "backbone.body.layer1", "backbone['0']", "backbone['1']",
        "backbone['2']",
    ],
    "fcos_resnet50_fpn": [
        "backbone.body.relu", "backbone.body.layer1", "backbone['0']", "backbone['1']",
        "backbone['2']",
    ],
    "ssdlite320_mobilenet_v3_large": [
        "backbone.features.0.1", "backbone.features.0.3", "backbone.features.0.6",
        "backbone['0']", "backbone['1']", "backbone['2']", "backbone['3']", "backbone['4']",
    ],
    "deeplabv3_resnet50": ["backbone.relu", "backbone.layer1", "classifier"],
    "fcn_resnet50": ["backbone.relu", "backbone.layer1", "classifier"],
    "lraspp_mobilenet_v3_large": ["backbone.1", "backbone.3", "backbone['high']", "classifier"],
    "timm:resnet18": ["act1", "layer1", "layer2", "layer3", "layer4"],
    "convnext_atto": ["stages.0", "stages.1", "stages.2", "stages"],
    "vit_tiny_patch16_224": ["blocks"],
    "swin_tiny_patch4_window7_224": ["layers.0", "layers.1", "layers.2", "layers"],
    "timm:efficientnet_b0": ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "bn2"],
    # (was s1.b1.conv1 ... on the old grids: a ConvNormAct whose BatchNormAct2d holds its
    # activation was not taken for a layer, and 24 channels on a 24 x 24 grid hid s1)
    "regnetx_002": ["stem", "s1", "s2", "s3", "s4"],
    "mobilevit_xxs": ["stages.0", "stages.1", "stages.2", "stages.3", "final_conv"],
    "ViTForImageClassification": ["vit.layers.1"],
    "ConvNextForImageClassification": [
        "convnext.encoder.stages.0", "convnext.encoder.stages.1", "convnext.encoder.stages.2",
        "convnext['last_hidden_state']",
    ],
    "SwinForImageClassification": [
        "swin.encoder.layers.0.blocks.0[0]", "swin.encoder.layers.1.blocks.0[0]",
        "swin.encoder['last_hidden_state']",
    ],
    "Dinov2Model": ["encoder['last_hidden_state']"],
    "Unet(resnet18)": [
        "encoder[5]", "decoder.blocks.0", "decoder.blocks.1", "decoder.blocks.2",
        "decoder.blocks.3", "segmentation_head",
    ],
}  # fmt: skip


def expected(entry: Entry) -> list[str]:
    return EXPECTED.get(f"{entry.source.split()[0]}:{entry.name}", EXPECTED.get(entry.name, []))


def finish_order(model: nn.Module, x: torch.Tensor, names: list[str]) -> list[str]:
    """``names`` sorted by when their module's first call finished (parts keep their order)."""
    order: dict[str, int] = {}
    handles = []
    for name in names:
        module = locate_layer(model, name)[1]

        def hook(_m: nn.Module, _i: Any, _o: Any, name: str = name) -> None:
            order.setdefault(name, len(order))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    # Parts of one module's output finish together: keep them in the order given.
    return sorted(names, key=lambda n: (order[n], names.index(n)))


def support_inside_trf(heatmap: torch.Tensor, trf: em.TRF) -> list[str]:
    """Dims where the map has mass outside the (finite) TRF's clipped interval."""
    bad = []
    nz = heatmap.nonzero()
    for d, ((lo, hi), is_global) in enumerate(zip(trf.clipped, trf.global_dims)):
        if is_global or not math.isfinite(trf.size[d]):
            continue
        idx = nz[:, d]
        if idx.numel() and (int(idx.min()) < lo or int(idx.max()) > hi):
            bad.append(f"dim {d}: mass at {int(idx.min())}..{int(idx.max())}, TRF {lo}..{hi}")
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("entry", ZOO, ids=[f"{e.source.split()[0]}-{e.name}" for e in ZOO])
def test_zoo_conformance(entry: Entry) -> None:
    if not entry.available:
        pytest.skip(f"{entry.source} is not installed")
    torch.manual_seed(0)
    model = entry.build().eval()
    x = make_input(entry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx -> numeric fallbacks, seeds degenerate at init
        # The TRFs of the auto picks, once (the numeric method is the slow part for
        # detectors), with the channels-last layouts that "auto" found (Swin stages).
        pick = pick_layers(model, x[:1])
        trfs = em.theoretical_rf(model, tuple(x.shape[1:]), pick.names, token_layout=pick.layouts)
        res = em.compute_erf(model, x, "auto", trf=trfs)
    names = list(res)
    assert names == pick.names == expected(entry)
    assert finish_order(model, x[:1], names) == names
    for name, r in res.items():
        module = locate_layer(model, name)[1]
        assert not isinstance(module, nn.LayerNorm) and "LayerNorm" not in type(module).__name__
        h = r.heatmap
        assert h.shape == x.shape[2:], name
        assert bool(torch.isfinite(h).all()) and bool((h >= 0).all()), name
        assert r.trf is not None and r.trf is trfs[name], name
        assert support_inside_trf(h, r.trf) == [], name
    # The same stages named explicitly, with no layout given, are read as "auto" reads them:
    # the same layouts, TRFs and maps (issue 18: one resolver for every path).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if all(t.method == "fx" for t in trfs.values()):  # numeric TRFs: the slow detectors
            named_trfs = em.theoretical_rf(model, tuple(x.shape[1:]), names)
            assert named_trfs == trfs
        named = em.compute_erf(model, x, names, trf=trfs)
    assert list(named) == names
    for name in names:
        torch.testing.assert_close(named[name].heatmap, res[name].heatmap, rtol=1e-5, atol=1e-7)
