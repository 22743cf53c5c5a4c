"""Vision transformers: token outputs mapped onto the patch grid, centre-token seeds, TRFs."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import VisionTransformer, vit_b_16

import erf_monitor as em
from erf_monitor.targets.tokens import (
    ResolvedLayout,
    layouts_for,
    resolve_layout,
    tokens_to_spatial,
)

ENC0 = "encoder.layers.encoder_layer_0"
ENC1 = "vit.encoder.layers.encoder_layer_1"
_CL = em.TokenLayout(channels_last=True)


def small_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )


def reference_token_erf(
    model: nn.Module, layer: str, x: torch.Tensor, token: int, channels_last: bool = False
) -> torch.Tensor:
    """Slow reference: one full forward and backward per sample, seed = one token's features."""
    model.eval()
    maps = []
    module = dict(model.named_modules())[layer]
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        box: dict[str, torch.Tensor] = {}

        def hook(_m: nn.Module, _i: object, o: torch.Tensor, box: dict = box) -> None:
            box.setdefault("y", o)

        handle = module.register_forward_hook(hook)
        try:
            model(xi)
        finally:
            handle.remove()
        y = box["y"]
        # (1, H, W, C): the token is the flat grid index; (1, L, D): the sequence index.
        seed = y.flatten(1, 2)[0, token].sum() if channels_last else y[0, token].sum()
        (g,) = torch.autograd.grad(seed, xi)
        maps.append(g.abs().sum(1)[0])
    return torch.stack(maps).mean(0)


def test_small_vit_patch_embedding_and_encoder_layer() -> None:
    vit = small_vit()
    x = torch.randn(3, 3, 32, 32)
    res = em.compute_erf(vit, x, layers=["conv_proj", ENC0])
    # 32 / 8 = 4 x 4 patches; the centre patch is (4 // 2, 4 // 2) = (2, 2), i.e. input rows and
    # columns 2 * 8 .. 2 * 8 + 7 = 16 .. 23; its centre is 19.5, rounded half up to 20.
    emb, enc = res["conv_proj"], res[ENC0]
    for r in (emb, enc):
        assert r.heatmap.shape == (32, 32)
        assert r.output_shape == (4, 4)
        assert r.centre_pixel == (20, 20)
        assert r.trf is not None and r.trf.centre == (19.5, 19.5)
        assert r.trf.output_centre == (2, 2)
    support = (emb.heatmap > 0).nonzero()
    assert support.min(0).values.tolist() == [16, 16]
    assert support.max(0).values.tolist() == [23, 23]
    assert int((emb.heatmap > 0).sum()) == 64
    assert emb.trf is not None
    assert emb.trf.size == (8.0, 8.0) and emb.trf.stride == (8.0, 8.0)
    assert not emb.trf.is_global and emb.trf.clipped == ((16, 23), (16, 23))
    # After one attention layer every pixel reaches the centre token.
    assert enc.trf is not None and enc.trf.is_global and math.isinf(enc.trf.size[0])
    assert enc.trf.clipped == ((0, 31), (0, 31))
    assert bool((enc.heatmap > 0).all())
    assert 0 < enc.coverage <= 1 and enc.ratio == enc.erf_size / 32
    # Slow reference: class token first, then the patches row-major -> token 1 + 2 * 4 + 2.
    ref = reference_token_erf(vit, ENC0, x, token=1 + 2 * 4 + 2)
    torch.testing.assert_close(enc.heatmap, ref, rtol=1e-5, atol=1e-9)


def test_patch_tokens_before_attention_have_the_kernel_as_trf() -> None:
    vit = small_vit()

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = vit
            self.tokens = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.tokens(self.vit._process_input(x))  # (N, 16, D): no class token

    trf = em.theoretical_rf(Embed(), (3, 32, 32), ["tokens"])["tokens"]
    assert trf.size == (8.0, 8.0) and trf.clipped == ((16, 23), (16, 23))
    assert not trf.is_global


def test_vit_b_16_auto_layout() -> None:
    torch.manual_seed(0)
    vit = vit_b_16(image_size=64)  # random init, 4 x 4 patches of 16
    x = torch.randn(1, 3, 64, 64)
    # (Not ``encoder.ln``: at init its weight is 1 and bias 0, so the Luo seed, the sum over
    # the features of a LayerNorm output, is constant and its ERF is identically zero.)
    last = "encoder.layers.encoder_layer_11"
    res = em.compute_erf(vit, x, layers=["conv_proj", ENC0, last])
    for name in (ENC0, last):
        r = res[name]
        assert r.heatmap.shape == (64, 64) and r.output_shape == (4, 4)
        assert r.trf is not None and r.trf.is_global
        assert r.centre_pixel == (40, 40)  # centre of patch (2, 2): 2 * 16 + 7.5, rounded up
        assert bool((r.heatmap > 0).all())
    support = (res["conv_proj"].heatmap > 0).nonzero()
    assert support.min(0).values.tolist() == [32, 32]
    assert support.max(0).values.tolist() == [47, 47]


class Tokenizer(nn.Module):
    """Patch embedding of patch ``p`` plus ``prefix`` learned tokens, then one token mixer."""

    def __init__(self, p: int, prefix: int, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, p, stride=p)
        self.prefix = nn.Parameter(torch.randn(1, prefix, dim))
        self.mix = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.prefix.expand(x.shape[0], -1, -1), t], dim=1)
        t = t + self.mix(t, t, t, need_weights=False)[0]
        return self.out(t)


def test_ambiguous_grid_needs_a_layout() -> None:
    torch.manual_seed(0)
    # 32 x 32 input, 5 tokens: 1 prefix + 2 x 2 patches of 16, or 4 prefixes + 1 patch of 32.
    model = Tokenizer(16, 1)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"ambiguous.*TokenLayout"):
        em.compute_erf(model, x, layers=["out"])
    layout = em.TokenLayout(grid=(2, 2), prefix_tokens=1)
    res = em.compute_erf(model, x, layers=["out"], token_layout=layout)
    r = res["out"]
    assert r.output_shape == (2, 2) and r.centre_pixel == (24, 24)
    ref = reference_token_erf(model, "out", x, token=1 + 1 * 2 + 1)
    torch.testing.assert_close(r.heatmap, ref, rtol=1e-5, atol=1e-9)
    # The mapping form, and a prefix alone (the grid follows).
    res2 = em.compute_erf(
        model, x, layers=["out"], token_layout={"out": em.TokenLayout(prefix_tokens=1)}
    )
    torch.testing.assert_close(res2["out"].heatmap, r.heatmap)
    with pytest.raises(ValueError, match="not probed"):
        em.compute_erf(model, x, layers=["out"], token_layout={"nope": layout})
    with pytest.raises(ValueError, match="do not fit"):
        em.compute_erf(model, x, layers=["out"], token_layout=em.TokenLayout(grid=(3, 3)))


def test_register_tokens_need_a_layout_then_match_the_reference() -> None:
    torch.manual_seed(0)
    model = Tokenizer(8, 5)  # 5 prefix tokens + 4 x 4 patches = 21 tokens
    x = torch.randn(2, 3, 32, 32)
    # Shapes alone cannot tell leading from trailing tokens: every split is a candidate.
    with pytest.raises(ValueError, match=r"ambiguous.*5 prefix token.*5 suffix token"):
        em.compute_erf(model, x, layers=["out"])
    layout = em.TokenLayout(prefix_tokens=5)
    r = em.compute_erf(model, x, layers=["out"], token_layout=layout)["out"]
    assert r.output_shape == (4, 4) and r.trf is not None and r.trf.is_global
    ref = reference_token_erf(model, "out", x, token=5 + 2 * 4 + 2)
    torch.testing.assert_close(r.heatmap, ref, rtol=1e-5, atol=1e-9)


def test_resolve_layout_rules() -> None:
    spatial = (32, 32)
    assert resolve_layout("l", (2, 8, 4, 4), None, spatial) is None  # conv-like
    assert resolve_layout("l", (2, 10), None, spatial) is None  # flat
    with pytest.raises(ValueError, match=r"grid 4x4 with 1 prefix.*grid 4x4 with 1 suffix"):
        resolve_layout("l", (2, 17, 8), None, spatial)  # one extra token: first or last?
    one = em.TokenLayout(prefix_tokens=1)
    assert resolve_layout("l", (2, 17, 8), one, spatial) == ResolvedLayout((4, 4), 1, False)
    assert resolve_layout("l", (2, 64, 8), None, spatial) == ResolvedLayout((8, 8), 0, False)
    assert resolve_layout("l", (2, 8, 16), None, (32,)) is None  # 1-D: (N, C, L) is conv-like
    # Non-square inputs: one patch size for both dims.
    assert resolve_layout("l", (1, 1 + 4 * 8, 8), one, (32, 64)) == ResolvedLayout((4, 8), 1, False)
    assert resolve_layout("l", (1, 4 * 8, 8), None, (32, 64)) == ResolvedLayout((4, 8), 0, False)
    with pytest.raises(ValueError, match="ambiguous"):  # 1 + 2x4 (p=16) or 7 + 1x2 (p=32)
        resolve_layout("l", (1, 1 + 2 * 4, 8), None, (32, 64))
    # One prefix token given: only p=16 fits (p=32 would leave 6 more tokens).
    assert resolve_layout("l", (1, 1 + 2 * 4, 8), one, (32, 64)) == ResolvedLayout((2, 4), 1, False)
    cl = em.TokenLayout(channels_last=True)
    assert resolve_layout("l", (2, 4, 4, 8), cl, spatial) == ResolvedLayout((4, 4), 0, True)
    with pytest.raises(ValueError, match="cannot be inferred"):
        resolve_layout("l", (2, 1000, 8), None, spatial)
    with pytest.raises(ValueError):
        em.TokenLayout(grid=(0, 2))
    t = torch.randn(2, 4, 4, 8)
    assert tokens_to_spatial(t, ResolvedLayout((4, 4), 0, True)).shape == (2, 8, 4, 4)


class SuffixTokens(nn.Module):
    """Patch embedding of 4 x 4 patches, then 3 learned tokens *appended* after the patches."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.extra = nn.Parameter(torch.randn(1, 3, dim))
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.out(torch.cat([t, self.extra.expand(x.shape[0], -1, -1)], dim=1))


def test_suffix_tokens_are_ambiguous_and_a_layout_places_them() -> None:
    torch.manual_seed(0)
    model = SuffixTokens()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"ambiguous.*3 prefix token.*3 suffix token") as err:
        em.compute_erf(model, x, layers=["out"])
    assert "suffix_tokens" in str(err.value)  # says how to fix it
    layout = em.TokenLayout(suffix_tokens=3)
    r = em.compute_erf(model, x, layers=["out"], token_layout=layout)["out"]
    # The centre patch token (4, 4) of the 8 x 8 grid is token 36: its 4 x 4 patch at 16..19.
    ref = reference_token_erf(model, "out", x, token=4 * 8 + 4)
    torch.testing.assert_close(r.heatmap, ref, rtol=1e-5, atol=1e-9)
    assert r.trf is not None and r.trf.clipped == ((16, 19), (16, 19))
    assert r.centre_pixel == (18, 18) and r.centroid_offset == pytest.approx((0.0, 0.0), abs=0.5)
    with pytest.raises(ValueError, match="do not fit"):
        em.compute_erf(model, x, ["out"], token_layout=em.TokenLayout(grid=(8, 8), prefix_tokens=1))


class SwinLike(nn.Module):
    """Channels-last stages: patch embedding, a local (depthwise 3x3) stage, a global mixer."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.local = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.stage1 = nn.Identity()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.stage2 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.patch(x).permute(0, 2, 3, 1))  # (N, H, W, C)
        y = y + self.local(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = self.stage1(y)
        n, h, w, c = y.shape
        t = y.reshape(n, h * w, c)
        y = (t + self.attn(t, t, t, need_weights=False)[0]).reshape(n, h, w, c)
        return self.stage2(y)


def test_swin_like_channels_last() -> None:
    torch.manual_seed(0)
    model = SwinLike()
    x = torch.randn(2, 3, 32, 32)
    layout = em.TokenLayout(channels_last=True)
    res = em.compute_erf(model, x, layers=["stage1", "stage2"], token_layout=layout)
    s1, s2 = res["stage1"], res["stage2"]
    # Grid 8 x 8 of 4-pixel patches; centre token (4, 4) covers pixels 16..19; the 3x3 mixer
    # adds one patch on each side: 12..23.
    assert s1.output_shape == (8, 8) and s1.trf is not None
    assert s1.trf.size == (12.0, 12.0) and s1.trf.clipped == ((12, 23), (12, 23))
    support = (s1.heatmap > 0).nonzero()
    assert support.min(0).values.tolist() == [12, 12]
    assert support.max(0).values.tolist() == [23, 23]
    assert s2.trf is not None and s2.trf.is_global and bool((s2.heatmap > 0).all())
    for name, r in res.items():
        ref = reference_token_erf(model, name, x, token=4 * 8 + 4, channels_last=True)
        torch.testing.assert_close(r.heatmap, ref, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="channels_last"):
        em.compute_erf(model, x, layers=["patch"], token_layout=em.TokenLayout(grid=(8, 8)))


def test_hybrid_conv_stem_and_attention() -> None:
    torch.manual_seed(0)

    class Hybrid(nn.Module):
        def __init__(self, dim: int = 8) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, dim, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(dim, dim, 3, stride=2, padding=1),
            )
            self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
            self.tokens = nn.Identity()
            self.mixed = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.tokens(self.stem(x).flatten(2).transpose(1, 2))  # (N, 64, D)
            return self.mixed(t + self.attn(t, t, t, need_weights=False)[0])

    model = Hybrid()
    x = torch.randn(2, 3, 32, 32)
    res = em.compute_erf(model, x, layers=["stem", "tokens", "mixed"])
    stem, tok, mixed = res["stem"], res["tokens"], res["mixed"]
    assert stem.trf is not None and tok.trf is not None and mixed.trf is not None
    # The token view of the stem output has the stem's TRF and map; attention makes it global.
    assert tok.trf.size == stem.trf.size == (7.0, 7.0) and not tok.trf.is_global
    assert tok.trf.clipped == stem.trf.clipped
    torch.testing.assert_close(tok.heatmap, stem.heatmap)
    assert mixed.trf.is_global and bool((mixed.heatmap > 0).all())


class WindowAttention(nn.Module):
    """Swin-style block on (N, H, W, C): attention inside ws x ws windows merged into the batch."""

    def __init__(self, dim: int, ws: int, use_mha: bool) -> None:
        super().__init__()
        self.ws, self.use_mha = ws, use_mha
        self.norm = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.ws
        win = self.norm(x).view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        t = win.reshape(-1, ws * ws, c)  # (N * windows, ws * ws, C)
        if self.use_mha:
            t = self.mha(t, t, t, need_weights=False)[0]
        else:
            q, k, v = self.qkv(t).chunk(3, dim=-1)
            t = nn.functional.scaled_dot_product_attention(q, k, v)
        back = t.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        return x + back.reshape(b, h, w, c)


class WindowedSwin(nn.Module):
    def __init__(self, use_mha: bool, dim: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.block = WindowAttention(dim, 4, use_mha)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(self.patch(x).permute(0, 2, 3, 1))
        return self.dw(y.permute(0, 3, 1, 2))


@pytest.mark.parametrize("use_mha", [False, True])
def test_windowed_attention_is_its_window_not_global(use_mha: bool) -> None:
    torch.manual_seed(0)
    model = WindowedSwin(use_mha)
    x = torch.randn(2, 3, 64, 64)
    layout = {"block": em.TokenLayout(channels_last=True)}
    res = em.compute_erf(model, x, layers=["block", "dw"], token_layout=layout)
    blk, dw = res["block"], res["dw"]
    # Grid 16 x 16 of 4-pixel patches in 4 x 4 windows. The centre token (8, 8) lies in window
    # (2, 2): patches 8..11, pixels 32..47. Attention mixes that window only, not the image.
    assert blk.trf is not None and not blk.trf.is_global
    assert blk.trf.size == (16.0, 16.0) and blk.trf.clipped == ((32, 47), (32, 47))
    support = (blk.heatmap > 0).nonzero()
    assert support.min(0).values.tolist() == [32, 32]
    assert support.max(0).values.tolist() == [47, 47]
    ref = reference_token_erf(model, "block", x, token=8 * 16 + 8, channels_last=True)
    torch.testing.assert_close(blk.heatmap, ref, rtol=1e-5, atol=1e-9)
    # The 3x3 conv after it reads patches 7..9: windows 1 and 2, pixels 16..47.
    assert dw.trf is not None and not dw.trf.is_global
    assert dw.trf.clipped == ((16, 47), (16, 47))
    support = (dw.heatmap > 0).nonzero()
    assert support.min(0).values.tolist() == [16, 16]
    assert support.max(0).values.tolist() == [47, 47]


@pytest.mark.filterwarnings("ignore:.*zero everywhere")
def test_transformer_encoder_layer_is_walked_and_post_norm_seed_warns() -> None:
    torch.manual_seed(0)

    class Hybrid(nn.Module):
        def __init__(self, norm_first: bool, dim: int = 8) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, dim, 4, stride=4)
            self.enc = nn.TransformerEncoderLayer(
                dim, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.enc(self.stem(x).flatten(2).transpose(1, 2))

    x = torch.randn(2, 3, 32, 32)
    pre = Hybrid(norm_first=True)
    trf = em.theoretical_rf(pre, (3, 32, 32), ["stem", "enc"])
    assert trf["enc"].method == "fx" and trf["enc"].is_global  # no numeric fallback
    assert trf["enc"].stride == (4.0, 4.0) and trf["stem"].size == (4.0, 4.0)
    r = em.compute_erf(pre, x, layers=["enc"])["enc"]
    assert r.output_shape == (8, 8) and bool((r.heatmap > 0).all())
    # Post-norm (PyTorch's default): the block ends in a LayerNorm whose feature sum is
    # constant at initialisation, so the Luo seed has no gradient. Say so.
    with pytest.warns(em.ERFProbeWarning, match="LayerNorm"):
        em.compute_erf(Hybrid(norm_first=False), x, layers=["enc"])
    with pytest.warns(em.ERFProbeWarning, match="LayerNorm"):
        em.compute_erf(small_vit(), x, layers=["encoder.ln"])


def test_lightning_callback_on_vit_and_swin_with_glob_layout(tmp_path: Path) -> None:
    """ERFMonitor works unchanged on transformers; ``token_layout`` is forwarded (globs too)."""
    L = pytest.importorskip("lightning.pytorch")
    torch.manual_seed(0)

    class Module(L.LightningModule):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.vit = small_vit()
            self.swin = WindowedSwin(use_mha=False)
            self.head = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.vit(x)[:, :4] + self.head(self.swin(x).mean((2, 3)))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    cb = em.ERFMonitor(
        layers=["vit.encoder.layers.encoder_layer_1", "swin.block"],
        every_n_steps=2,
        num_samples=4,
        min_coverage=None,
        strict=True,
        token_layout={"swin.*": em.TokenLayout(channels_last=True)},
    )
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", devices=1, logger=L.loggers.CSVLogger(str(tmp_path)),
        callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(Module(), loader)
    assert set(cb.history) == {"vit.encoder.layers.encoder_layer_1", "swin.block"}
    assert all(len(steps) >= 2 for steps in cb.history.values())
    vit_last = cb.history["vit.encoder.layers.encoder_layer_1"][max(cb.history[ENC1])]
    swin_last = cb.history["swin.block"][max(cb.history["swin.block"])]
    assert vit_last["trf_global"] == 1 and swin_last["trf_global"] == 0
    # 32 x 32 input, 8 x 8 tokens of 4 px in 4 x 4 windows: the centre token's window is 16 px.
    assert swin_last["trf_size"] == 16
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "swin.block" in metrics and "encoder_layer_1" in metrics


@pytest.mark.parametrize("kind", ["vit", "vit_reg4", "deit_distilled", "gap"])
def test_timm_layouts_are_inferred(kind: str) -> None:
    """timm models say how: ``patch_embed.patch_size`` and ``num_prefix_tokens`` (random init)."""
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    small: dict[str, Any] = {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
    }
    if kind == "deit_distilled":
        model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **small)
    else:
        extras: dict[str, dict[str, Any]] = {
            "vit": {},
            "vit_reg4": {"reg_tokens": 4},
            "gap": {"class_token": False},
        }
        extra = extras[kind]
        model = TimmViT(mlp_ratio=2.0, global_pool="avg" if kind == "gap" else "token",
                        **small, **extra)  # fmt: skip
    prefix = {"vit": 1, "vit_reg4": 5, "deit_distilled": 2, "gap": 0}[kind]
    assert model.num_prefix_tokens == prefix
    x = torch.randn(2, 3, 32, 32)
    res = em.compute_erf(model, x, layers=["patch_embed", "blocks.1"])
    emb, blk = res["patch_embed"], res["blocks.1"]
    assert emb.trf is not None and emb.trf.method == "fx" and emb.trf.size == (8.0, 8.0)
    assert emb.trf.clipped == ((16, 23), (16, 23))
    assert blk.trf is not None and blk.trf.method == "fx" and blk.trf.is_global
    assert blk.output_shape == (4, 4) and bool((blk.heatmap > 0).all())
    ref = reference_token_erf(model, "blocks.1", x, token=prefix + 2 * 4 + 2)
    torch.testing.assert_close(blk.heatmap, ref, rtol=1e-5, atol=1e-9)


def test_layouts_for_names_globs_and_errors() -> None:
    cl, seq = em.TokenLayout(channels_last=True), em.TokenLayout(prefix_tokens=1)
    names = ["stem", "stages.0", "stages.1", "head"]
    assert layouts_for(None, names) == {}
    assert layouts_for(seq, ["a", "b"]) == {"a": seq, "b": seq}
    # A glob covers its layers; an exact name wins over a glob whatever the order.
    got = layouts_for({"stages.1": seq, "stages.*": cl}, names)
    assert got == {"stages.0": cl, "stages.1": seq}
    with pytest.raises(ValueError, match="not probed"):
        layouts_for({"blocks.*": cl}, names)
    with pytest.raises(TypeError, match="token_layout"):
        layouts_for({"stem": "channels_last"}, names)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="token_layout"):
        em.ERFMonitor(layers=["stem"], token_layout=(8, 8))  # type: ignore[arg-type]


def test_numeric_trf_seeds_the_centre_token_like_fx() -> None:
    """The numeric fallback puts token outputs on their grid too (same centre unit as fx)."""
    torch.manual_seed(0)
    cases: list[tuple[nn.Module, tuple[int, ...], list[str], Any]] = [
        (small_vit(), (3, 32, 32), ["conv_proj", ENC0], None),
        (WindowedSwin(use_mha=True), (3, 64, 64), ["block", "dw"], {"block": _CL}),
    ]
    for model, shape, layers, layout in cases:
        fx = em.theoretical_rf(model, shape, layers, method="fx", token_layout=layout)
        num = em.theoretical_rf(model, shape, layers, method="numeric", token_layout=layout)
        for name in layers:
            a, b = fx[name], num[name]
            assert (a.size, a.clipped, a.is_global, a.centre) == (
                b.size, b.clipped, b.is_global, b.centre
            ), name  # fmt: skip
            assert a.output_centre == b.output_centre and a.output_shape == b.output_shape
    # Inside one attention window the numeric stride is not 0 (units share one support).
    assert num["block"].stride == (4.0, 4.0)


def test_cnn_vs_vit_example_runs(tmp_path: Path) -> None:
    """examples/cnn_vs_vit.py, shortened: both watchers log, the figure is written."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "cnn_vs_vit.py"
    spec = importlib.util.spec_from_file_location("cnn_vs_vit", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig.png"
    got = example.main(steps=4, every=2, out=str(out))
    assert out.stat().st_size > 10_000
    for k in ("CNN", "ViT"):
        assert sorted(got["history"][k]) == [0, 2, 4]
    vit0 = got["history"]["ViT"][0]
    assert vit0["trf_global"] == 1 and got["history"]["CNN"][0]["trf_size"] == 19


def test_runtime_slice_bounds_are_traced() -> None:
    """``x[:, :, :h]`` with ``h`` read from a shape at run time: the tracer knows the shape."""

    class Crop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=2)
            self.out = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, w = x.shape[2], x.shape[3]
            return self.out(self.conv(x)[:, :, :h, :w])

    with warnings.catch_warnings():
        warnings.simplefilter("error", em.ERFProbeWarning)
        trf = em.theoretical_rf(Crop(), (1, 9, 9), ["out"])["out"]
    # Output (4, 4) of the padded 3x3 conv reads input rows and columns 4 - 2 .. 4 + 0.
    assert trf.method == "fx" and trf.size == (3.0, 3.0) and trf.interval == ((2, 4), (2, 4))


def test_timm_swin_with_channels_last_layout() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=56, window_size=7,
        embed_dim=16, depths=(2, 2), num_heads=(2, 2),
    )  # fmt: skip
    x = torch.randn(2, 3, 56, 56)
    with warnings.catch_warnings():
        warnings.simplefilter("error", em.ERFProbeWarning)  # traced: no numeric fallback
        res = em.compute_erf(model, x, layers=["layers.0.blocks.0"], token_layout=_CL)
    r = res["layers.0.blocks.0"]
    assert r.trf is not None and r.trf.method == "fx"
    # 14 x 14 tokens of 4 px in 7 x 7 windows: the centre token (7, 7) is in window (1, 1),
    # tokens 7..13, pixels 28..55.
    assert r.output_shape == (14, 14) and r.trf is not None and not r.trf.is_global
    assert r.trf.clipped == ((28, 55), (28, 55))
    support = (r.heatmap > 0).nonzero()
    assert support.min(0).values.tolist() == [28, 28]
    assert support.max(0).values.tolist() == [55, 55]


@pytest.mark.parametrize("registers", [0, 2])
def test_hugging_face_dinov2_layout_from_its_embeddings(registers: int) -> None:
    """HF embeddings advertise the patch size and the class/register tokens: no guessing."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_register_tokens=registers,
    )  # fmt: skip
    model = (
        transformers.Dinov2WithRegistersModel(cfg) if registers else transformers.Dinov2Model(cfg)
    )
    x = torch.randn(2, 3, 32, 32)
    name = "encoder.layer.0"
    res = em.compute_erf(model, x, [name], forward_fn=lambda m, t: m(pixel_values=t))
    r = res[name]
    # The seed is the centre patch token of the 4x4 grid (prefix = 1 + registers): its
    # theoretical centre is patch (2, 2)'s centre, 2 * 8 + 3.5 = 19.5 px.
    assert r.output_shape == (4, 4)
    assert r.theoretical_centre == pytest.approx((19.5, 19.5))
