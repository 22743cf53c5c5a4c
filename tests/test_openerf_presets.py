"""``layers="auto"`` against OpenERF's per-family presets on timm transformers (random init).

OpenERF (Kim et al.; ``openerf/model_zoo.py``) measures one layer per timm family: ``norm``
for ViT and DeiT, the output of ``forward_features`` for CaiT, XCiT, BEiT and Swin; its seed is
the channel mean of the upper-left central token (prefix tokens skipped). ``layers="auto"``
picks one layer per stage; what is checked here, per family:

* its deepest pick is on the same token grid as OpenERF's target (the same stage);
* OpenERF's target is a per-token function of that pick (the final LayerNorm, CaiT's and
  XCiT's class-attention updates of the patch tokens): the gradient of OpenERF's seed reaches
  the pick's output at exactly one token, the one at OpenERF's centre position. So the two
  measure the same stage at the same unit; the difference is the last per-token transform.
* why ``auto`` does not pick OpenERF's ``norm`` itself: at initialisation (LayerNorm weight 1,
  bias 0) the channel mean of a LayerNorm's output is 0 for every input, so OpenERF's seed
  there has no gradient beyond rounding (``docs/guides/papers.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from erf_monitor.targets.auto import pick_layers

timm = pytest.importorskip("timm")

#: family -> (timm model, small configuration, OpenERF's target, auto's picks at 64 px)
FAMILIES: dict[str, tuple[str, dict[str, Any], str, list[str]]] = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 64, "depth": 2}, "norm", ["blocks"]),
    "deit": ("deit_tiny_patch16_224", {"img_size": 64, "depth": 2}, "norm", ["blocks"]),
    "cait": ("cait_xxs24_224", {"img_size": 64, "depth": 2}, "forward_features", ["blocks"]),
    "xcit": (
        "xcit_tiny_12_p16_224",
        {"img_size": 64, "depth": 2},
        "forward_features",
        ["patch_embed.proj.1", "patch_embed.proj.3", "patch_embed.proj.5", "cls_attn_blocks.1"],
    ),
    "beit": (
        "beit_base_patch16_224",
        {"img_size": 64, "depth": 2, "embed_dim": 192, "num_heads": 3},
        "forward_features",
        ["blocks.1"],
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"img_size": 64},
        "forward_features",
        ["layers.0", "layers.1", "layers.2", "layers"],
    ),
}


def build(family: str) -> nn.Module:
    name, kwargs, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def openerf_centre(grid: int) -> int:
    """OpenERF's centre token on a ``grid x grid`` patch grid: the central one, the upper-left
    of the central four on even grids."""
    c = (grid - 1) // 2
    return c * grid + c


def as_tokens(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(N, L, D)`` tokens of a sequence or an NHWC map, and the side of its patch grid."""
    if t.dim() == 4:  # Swin's NHWC stages
        n, h, w, d = t.shape
        assert h == w
        return t.reshape(n, h * w, d), h
    for prefix in range(0, 3):  # class / distillation tokens before the patches
        s = round((t.shape[1] - prefix) ** 0.5)
        if s * s == t.shape[1] - prefix:
            return t, s
    raise AssertionError(f"no square patch grid in {tuple(t.shape)}")


def run(
    model: nn.Module, pick: str, target: str, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pick's output and OpenERF's target output of one forward (graph kept)."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            out.retain_grad()
            seen[key] = out

        return hook

    handles = [modules[pick].register_forward_hook(keep("pick"))]
    if target != "forward_features":
        handles.append(modules[target].register_forward_hook(keep("target")))
    try:
        features = model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return seen["pick"], seen.get("target", features)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_auto_measures_openerf_stage_at_openerf_unit(family: str) -> None:
    model = build(family)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    picks = pick_layers(model, x).names
    assert picks == FAMILIES[family][3]
    deepest, target = picks[-1], FAMILIES[family][2]
    norm = getattr(model, "norm", None)
    if isinstance(norm, nn.LayerNorm):  # a trained LayerNorm: OpenERF's seed not degenerate
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.5, generator=torch.Generator().manual_seed(1))
            norm.bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    out, tgt = run(model, deepest, target, x)
    tgt_tokens, grid = as_tokens(tgt)
    prefix = tgt_tokens.shape[1] - grid * grid
    seed = tgt_tokens[0, prefix + openerf_centre(grid)].mean()  # OpenERF's seed
    seed.backward()
    assert out.grad is not None
    grad, pick_grid = as_tokens(out.grad)
    assert pick_grid == grid  # the same stage: the same patch grid
    pick_prefix = grad.shape[1] - grid * grid
    reached = (grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert reached == [pick_prefix + openerf_centre(grid)]  # one token: OpenERF's centre unit
    assert grad[1].abs().sum() == 0  # and nothing of the other image


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vit", "deit"])
def test_openerf_norm_seed_is_degenerate_at_init(family: str) -> None:
    # Why auto never picks a LayerNorm: at init its output's channel mean is 0 whatever the
    # input, so OpenERF's seed on `norm` has no gradient beyond float rounding, while the
    # same seed on auto's pick (the blocks feeding the norm) has a real one.
    model = build(family)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    out, tgt = run(model, "blocks", "norm", x)
    centre = 1 + openerf_centre(4)
    (g_norm,) = torch.autograd.grad(tgt[0, centre].mean(), x, retain_graph=True)
    (g_pick,) = torch.autograd.grad(out[0, centre].mean(), x)
    assert float(tgt[:, 1:].detach().mean(-1).abs().max()) < 1e-6
    assert float(g_norm.abs().max()) < 1e-4 * float(g_pick.abs().max())
