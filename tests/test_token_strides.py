"""Token layers at input sizes the patch does not divide (issue 25, item 4).

A Hugging Face Dinov2 (patch 14) floors the input into its patch grid: 96 px gives 6 x 6
patches covering 84 px, 105 px 7 x 7 covering 98 px. The patch tokens' stride is the
convolution's, 14, at every size; the centre token ``c`` sees pixels ``[14 c, 14 c + 13]``.
"""

from __future__ import annotations

import pytest
import torch

import erf_monitor as em

transformers = pytest.importorskip("transformers")


def _dinov2() -> torch.nn.Module:
    config = transformers.Dinov2Config(
        image_size=98, patch_size=14, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Dinov2Model(config).eval()


@pytest.mark.parametrize("px", [96, 105])
def test_dinov2_patch_tokens_have_the_patch_stride(px: int) -> None:
    net = _dinov2()
    grid = px // 14  # the convolution floors: 6 at 96 px, 7 at 105 px
    c = grid // 2
    names = ["embeddings.patch_embeddings", "encoder.layer.0"]
    trfs = em.theoretical_rf(net, (3, px, px), names)  # at 105 px "ambiguous" before
    embed, block = trfs[names[0]], trfs[names[1]]
    assert embed.stride == (14.0, 14.0)  # was 16 at 96 px, 15 at 105 px
    assert embed.size == (14.0, 14.0)
    assert embed.interval == ((14 * c, 14 * c + 13),) * 2
    assert block.is_global and block.stride == (14.0, 14.0)
    assert block.centre == (14 * c + 6.5,) * 2  # the centre token's own centre
    # The probe: the patch token's map is the gradient of its 14 x 14 patch, nowhere else.
    x = torch.randn(2, 3, px, px)
    res = em.compute_erf(net, x, names)
    heat = res[names[0]].heatmap
    inside = torch.zeros(px, px, dtype=torch.bool)
    inside[14 * c : 14 * c + 14, 14 * c : 14 * c + 14] = True
    assert bool((heat[inside] > 0).all()) and not bool(heat[~inside].any())
    weight = net.embeddings.patch_embeddings.projection.weight.detach()  # (D, 3, 14, 14)
    assert torch.allclose(heat[inside].reshape(14, 14), weight.sum(0).abs().sum(0), rtol=1e-5)
    assert res[names[1]].trf is not None and res[names[1]].trf.stride == (14.0, 14.0)


class _ExtraToken(torch.nn.Module):
    """A Dinov2 block whose output gains a trailing token the model does not advertise."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, *args: object, **kw: object) -> tuple[torch.Tensor]:
        out = self.block(x, *args, **kw)
        y = out[0] if isinstance(out, tuple) else out
        return (torch.cat([y, y[:, :1]], 1),)


def test_the_ambiguity_error_proposes_only_the_models_patch() -> None:
    net = _dinov2()
    net.encoder.layer[0] = _ExtraToken(net.encoder.layer[0])
    with pytest.raises(ValueError, match="ambiguous") as info:
        em.compute_erf(net, torch.randn(1, 3, 105, 105), ["encoder.layer.0[0]"], trf="skip")
    text = str(info.value)
    # 51 tokens = 49 patches of 14 px + 2 others; 15 px also divides 105 into 7 x 7, but the
    # model's patch is 14.
    assert "patch 14" in text and "patch 15" not in text, text
    assert "grid 7x7" in text, text
    layout = em.TokenLayout(grid=(7, 7), prefix_tokens=1, suffix_tokens=1)
    trf = em.theoretical_rf(net, (3, 105, 105), ["encoder.layer.0[0]"], token_layout=layout)
    assert trf["encoder.layer.0[0]"].stride == (14.0, 14.0)


@pytest.mark.parametrize("px", [96, 105])
def test_the_numeric_method_reports_the_patch_stride_too(px: int) -> None:
    net = _dinov2()
    c = (px // 14) // 2
    names = ["embeddings.patch_embeddings", "encoder.layer.0"]
    trfs = em.theoretical_rf(net, (3, px, px), names, method="numeric")
    embed, block = trfs[names[0]], trfs[names[1]]
    assert embed.clipped == ((14 * c, 14 * c + 13),) * 2 and embed.stride == (14.0, 14.0)
    assert block.is_global and block.stride == (14.0, 14.0)  # was 16 / 15
    assert block.centre == (14 * c + 6.5,) * 2
