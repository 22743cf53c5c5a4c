"""Exact TRFs through shifted windows (Swin): each new rule, and whole models, against brute force.

The reference is written here, independently of the fx walk: the support of
``d(sum_c w_c y[unit, c]) / dx`` for one output unit of a layer, in float64, for random inputs
in ``[0.5, 1.5)`` and random positive channel weights ``w``, united over two inputs.

The masked-attention decision (``erf_monitor/trf/masks.py``): a logit that a constant mask
shifts by ``-100`` (Swin's convention) or less does not count as a dependence. Through such a
logit the gradient is ``exp(-100)`` ~ ``3.7e-44`` times the unmasked ones, so the reference
counts ``|grad| > 1e-30 * max |grad|`` as support: every other dependence in these models is
many orders of magnitude above that line, every masked one far below it. One test shows that
the raw support (``|grad| > 0``) does reach across the image through the masked logits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import erf_monitor as em

CL = em.TokenLayout(channels_last=True)
REL = 1e-30  # support threshold relative to the largest gradient (see the module docstring)


class _Stop(Exception):
    pass


Unit = tuple[int | None, int | None]  # None: the centre index of that dim
Picker = Callable[[Any, tuple[int, int], tuple[int, int]], torch.Tensor]


def channels_last(out: Any, idx: tuple[int, int], _grid: tuple[int, int]) -> torch.Tensor:
    """The feature vectors ``(N, C)`` of unit ``idx`` of a ``(N, H, W, C)`` output."""
    return out[:, idx[0], idx[1], :]


def tokens_first(out: Any, idx: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The feature vectors of unit ``idx`` of the ``(N, H*W, C)`` tokens in ``out[0]``."""
    return out[0][:, idx[0] * grid[1] + idx[1], :]


def resolve(unit: Unit, grid: Sequence[int]) -> tuple[int, int]:
    return tuple(n // 2 if i is None else i % n for i, n in zip(unit, grid))  # type: ignore[return-value]


def support(
    model: nn.Module,
    shape: tuple[int, int, int],
    jobs: list[tuple[str, tuple[int, int], tuple[int, int]]],
    pick: Picker = channels_last,
    forward_fn: Callable[[nn.Module, torch.Tensor], Any] | None = None,
    *,
    raw: bool = False,
    trials: int = 2,
    chunk: int = 4,
) -> list[np.ndarray]:
    """Per job ``(layer, unit index, output grid)``: the 2-D input support (rows, cols).

    One sample per (job, trial); samples never interact (eval mode), so one backward per
    chunk gives each sample's own gradient.
    """
    model = model.double().eval()
    fwd = forward_fn or (lambda m, x: m(x))
    modules = dict(model.named_modules())
    samples = [job for job in jobs for _ in range(trials)]
    gen = torch.Generator().manual_seed(0)
    found: list[np.ndarray] = []
    for start in range(0, len(samples), chunk):
        part = samples[start : start + chunk]
        x = torch.rand((len(part), *shape), generator=gen, dtype=torch.float64) + 0.5
        x.requires_grad_(True)
        layers = sorted({layer for layer, _, _ in part})
        outs: dict[str, Any] = {}
        handles = []

        def hook(name: str, outs: dict[str, Any] = outs, n: int = len(layers)) -> Any:
            def fn(_m: nn.Module, _i: Any, out: Any) -> None:
                outs.setdefault(name, out)
                if len(outs) == n:
                    raise _Stop

            return fn

        for name in layers:  # (a layer's output selector, "[0]", is the picker's job)
            handles.append(modules[name.split("[")[0]].register_forward_hook(hook(name)))
        try:
            fwd(model, x)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        seed = x.new_zeros(())
        for i, (layer, idx, grid) in enumerate(part):
            v = pick(outs[layer], idx, grid)[i]
            w = torch.rand(v.shape, generator=gen, dtype=torch.float64) + 0.5
            seed = seed + (v * w).sum()
        (grad,) = torch.autograd.grad(seed, x)
        for i in range(len(part)):
            a = grad[i].abs().sum(0)
            found.append((a > (0 if raw else REL * a.max())).numpy())
    out = []
    for k in range(len(jobs)):
        sup = found[k * trials]
        for t in range(1, trials):
            sup = sup | found[k * trials + t]
        out.append(sup)
    return out


def hull(mask: np.ndarray) -> tuple[int, int]:
    nz = np.flatnonzero(mask)
    return (int(nz[0]), int(nz[-1])) if nz.size else (0, -1)


def check_model(
    model: nn.Module,
    shape: tuple[int, int, int],
    layers: list[str],
    units: list[Unit],
    *,
    pick: Picker = channels_last,
    forward_fn: Callable[[nn.Module, torch.Tensor], Any] | None = None,
    token_layout: Any = CL,
) -> list[tuple[str, tuple[int, int], em.TRF, np.ndarray]]:
    """TRF of every (layer, unit) against the reference: clipped hulls and global dims."""
    model = model.eval()
    jobs, trfs = [], []
    for layer in layers:
        for unit in units:
            probe = em.theoretical_rf(
                model, shape, [layer], token_layout=token_layout, forward_fn=forward_fn
            )[layer]
            idx = resolve(unit, probe.output_shape)
            with warnings.catch_warnings():
                warnings.simplefilter("error", em.ERFProbeWarning)  # no numeric fallback
                trf = em.theoretical_rf(
                    model, shape, [layer], token_layout=token_layout, forward_fn=forward_fn,
                    position=idx,
                )[layer]  # fmt: skip
            assert trf.method == "fx" and trf.output_centre == idx
            jobs.append((layer, idx, probe.output_shape))
            trfs.append(trf)
    sups = support(model, shape, jobs, pick, forward_fn)
    done = []
    for (layer, idx, _grid), trf, sup in zip(jobs, trfs, sups):
        rows, cols = sup.any(1), sup.any(0)
        assert list(trf.clipped) == [hull(rows), hull(cols)], (layer, idx)
        for d, proj in enumerate((rows, cols)):
            if trf.global_dims[d]:
                assert proj.all(), (layer, idx, d)  # global: the whole axis, nothing less
        done.append((layer, idx, trf, sup))
    return done


# ----------------------------------------------------------------------------- toy Swin


class PatchEmbed(nn.Module):
    """``p x p`` patches, stride ``p``, to channels-last ``(N, H, W, C)``."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def shift_labels(n: int, window: int, shift: int) -> torch.Tensor:
    """Swin's mask regions along one padded axis: 0 before the last window, then 1, then 2."""
    i = torch.arange(n)
    return (i >= n - window).long() + (i >= n - shift).long()


class WindowBlock(nn.Module):
    """One (shifted) window attention block, written out as torchvision/timm/HF Swin do.

    ``attention``: ``"masked"`` (Swin's -100 mask added to the logits), ``"inf"`` (a -inf
    ``masked_fill``), ``"sdpa"`` (the -100 mask given to ``scaled_dot_product_attention``),
    ``"sdpa-bool"`` (a boolean mask) or ``"unmasked"`` (no mask: the shifted windows really
    wrap around the image). ``roll_first``: shift, then pad (timm); else pad, then shift.
    """

    def __init__(
        self, dim: int, window: tuple[int, int], shift: tuple[int, int], attention: str,
        roll_first: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.window, self.shift, self.attention = window, shift, attention
        self.roll_first = roll_first
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                 nn.Linear(2 * dim, dim))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        (wh, ww), (sh, sw) = self.window, self.shift
        y = self.norm(x)
        ph, pw = (-h) % wh, (-w) % ww
        if self.roll_first and (sh or sw):
            y = torch.roll(y, shifts=(-sh, -sw), dims=(1, 2))
        y = F.pad(y, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        if not self.roll_first and (sh or sw):
            y = torch.roll(y, shifts=(-sh, -sw), dims=(1, 2))
        nh, nw, n = hp // wh, wp // ww, wh * ww
        win = y.view(b, nh, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, n, c)
        q, k, v = self.qkv(win).chunk(3, dim=-1)
        out = self.attend(q, k, v, b, (nh, nw), (hp, wp))
        out = self.proj(out).view(b, nh, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(b, hp, wp, c)
        if not self.roll_first and (sh or sw):
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        out = out[:, :h, :w, :]
        if self.roll_first and (sh or sw):
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        x = x + out
        return x + self.mlp(x)

    def region_mask(self, windows: tuple[int, int], padded: tuple[int, int]) -> torch.Tensor:
        """``(windows, n, n)``: True where query and key lie in different shift regions."""
        (wh, ww), (sh, sw) = self.window, self.shift
        labels = (
            shift_labels(padded[0], wh, sh)[:, None] * 3 + shift_labels(padded[1], ww, sw)[None, :]
        )
        lab = labels.view(windows[0], wh, windows[1], ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
        return lab[:, None, :] != lab[:, :, None]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int,
        windows: tuple[int, int], padded: tuple[int, int],
    ) -> torch.Tensor:  # fmt: skip
        shifted = any(self.shift) and self.attention != "unmasked"
        different = self.region_mask(windows, padded).repeat(b, 1, 1) if shifted else None
        if self.attention.startswith("sdpa"):
            mask = None
            if different is not None and self.attention == "sdpa-bool":
                mask = ~different
            elif different is not None:
                mask = different.to(q.dtype) * -100.0
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if different is not None and self.attention == "inf":
            logits = logits.masked_fill(different, float("-inf"))
        elif different is not None:
            logits = logits + different.to(q.dtype) * -100.0
        return logits.softmax(dim=-1) @ v


def toy(
    patch: int, window: tuple[int, int], shift: tuple[int, int], attention: str,
    roll_first: bool = False, dim: int = 4,
) -> nn.Module:  # fmt: skip
    torch.manual_seed(0)
    return nn.Sequential(
        PatchEmbed(patch, dim),
        WindowBlock(dim, window, (0, 0), attention, roll_first),
        WindowBlock(dim, window, shift, attention, roll_first),
    )


# ----------------------------------------------------------------------------- rules


class Rolled(nn.Module):
    """Valid 3x3 convolutions around a ``torch.roll`` of the first one's output."""

    def __init__(self, shifts: tuple[int, int]) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(4, 4, 3)
        self.shifts = shifts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.roll(self.a(x), shifts=self.shifts, dims=(2, 3))
        return self.b(y).permute(0, 2, 3, 1)


@pytest.mark.parametrize("shifts", [(2, 0), (-3, 1), (9, -11)])
def test_roll_is_a_cyclic_shift_of_the_field(shifts: tuple[int, int]) -> None:
    model = nn.Sequential(Rolled(shifts))
    units: list[Unit] = [(None, None), (0, 0), (-1, -1), (1, 5), (7, 0)]
    for _layer, idx, trf, sup in check_model(model, (3, 12, 10), ["0"], units):
        for d, proj in enumerate((sup.any(1), sup.any(0))):
            # A roll moves the field (as a translation on an infinite plane), never grows it;
            # where the field crosses the border it reads the far side: one run, cyclically.
            assert trf.size[d] == 5, (idx, d)
            nz = np.flatnonzero(proj)
            assert trf.wrapped[d] == bool(np.any(np.diff(nz) > 1)), (idx, d)


class WindowMean(nn.Module):
    """Window partition, a mean inside each window (global within it), window reverse."""

    def __init__(self, window: tuple[int, int]) -> None:
        super().__init__()
        self.embed = PatchEmbed(2, 4)
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.embed(x)
        b, h, w, c = y.shape
        wh, ww = self.window
        win = y.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
        win = win.reshape(-1, wh * ww, c)
        win = win.mean(dim=1, keepdim=True).expand(-1, wh * ww, -1)
        out = win.reshape(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
        return out.reshape(b, h, w, c)


def test_window_partition_and_reverse_are_exact() -> None:
    model = nn.Sequential(WindowMean((3, 2)))
    done = check_model(model, (3, 12, 16), ["0"], [(None, None), (0, 0), (-1, -1), (2, 5)])
    for _layer, idx, trf, _sup in done:
        # The unit's window, in pixels (patches of 2): rows of 3 patches, columns of 2.
        top, left = idx[0] // 3 * 3 * 2, idx[1] // 2 * 2 * 2
        assert trf.clipped == ((top, top + 5), (left, left + 3))
        assert not any(trf.global_dims) and not trf.local  # windows sit at fixed places


@pytest.mark.parametrize("attention", ["masked", "inf", "sdpa", "sdpa-bool", "unmasked"])
@pytest.mark.parametrize("roll_first", [False, True])
def test_shifted_window_attention(attention: str, roll_first: bool) -> None:
    model = toy(2, (3, 3), (1, 1), attention, roll_first)
    check_model(model, (3, 16, 14), ["2"], [(None, None), (0, 0), (-1, -1), (0, -1), (3, 6)])


def test_masked_logits_do_not_count_and_the_raw_gradient_shows_why() -> None:
    """A corner unit after a shifted block: its shifted window, filled from both ends of the
    image, is split by the -100 mask. The TRF stays at the corner; the raw gradient (the
    exp(-100)-sized entries) reaches the far side, which an unmasked model really reads."""
    masked, unmasked = toy(2, (3, 3), (1, 1), "masked"), toy(2, (3, 3), (1, 1), "unmasked")
    shape = (3, 24, 24)  # 12 x 12 tokens, windows of 3, shifted by 1
    trf = check_model(masked, shape, ["2"], [(0, 0)])[0][2]
    raw = support(masked, shape, [("2", (0, 0), (12, 12))], raw=True)[0]
    wrapped, far = check_model(unmasked, shape, ["2"], [(0, 0)])[0][2:]
    # Masked: token 0 alone in its part of the shifted window, then its plain window 0..2.
    assert trf.clipped == ((0, 5), (0, 5)) and not any(trf.wrapped)
    assert hull(raw.any(1)) == (0, 23) and raw.any(1)[18:].all()  # the masked far side
    # Unmasked: the shifted window is tokens 10, 11, 0, then the plain windows 9..11, 0..2.
    assert np.flatnonzero(far.any(1)).tolist() == [*range(6), *range(18, 24)]
    assert wrapped.clipped == ((0, 23), (0, 23)) and all(wrapped.wrapped)
    assert wrapped.size == (12.0, 12.0)


@settings(max_examples=60, deadline=None)
@given(
    patch=st.integers(1, 2),
    window=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    shift_frac=st.tuples(st.floats(0, 0.99), st.floats(0, 0.99)),
    grid=st.tuples(st.integers(1, 11), st.integers(1, 11)),
    attention=st.sampled_from(["masked", "inf", "sdpa", "sdpa-bool", "unmasked"]),
    roll_first=st.booleans(),
    unit=st.tuples(st.integers(-12, 12) | st.none(), st.integers(-12, 12) | st.none()),
)
def test_property_random_windows_shifts_and_sizes(
    patch: int, window: tuple[int, int], shift_frac: tuple[float, float],
    grid: tuple[int, int], attention: str, roll_first: bool, unit: Unit,
) -> None:  # fmt: skip
    shift = tuple(int(f * w) for f, w in zip(shift_frac, window))
    model = toy(patch, window, shift, attention, roll_first)  # type: ignore[arg-type]
    shape = (3, grid[0] * patch, grid[1] * patch)
    check_model(model, shape, ["1", "2"], [unit])


# ----------------------------------------------------------------------------- models

CORNERS: list[Unit] = [(None, None), (0, 0), (-1, -1)]


@pytest.mark.slow
@pytest.mark.parametrize("size", [(224, 224), (200, 264)])
def test_torchvision_swin_t_all_stages(size: tuple[int, int]) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.swin_t()
    layers = ["features.1", "features.3", "features.5", "features.7"]
    done = check_model(model, (3, *size), layers, CORNERS)
    if size == (224, 224):  # stage 1: 7 x 7 windows of 4-pixel patches, shifted by 3
        assert [trf.clipped for layer, _, trf, _ in done if layer == "features.1"] == [
            ((84, 139), (84, 139)), ((0, 27), (0, 27)), ((196, 223), (196, 223)),
        ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("size", [(224, 224), (160, 200)])
def test_timm_swin_all_stages(size: tuple[int, int]) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kwargs = {} if size == (224, 224) else {"img_size": size}
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs)
    check_model(model, (3, *size), ["layers.0", "layers.1", "layers.2", "layers.3"], CORNERS)


@pytest.mark.parametrize("size", [(64, 64), (40, 56)])
def test_hugging_face_swin_blocks(size: tuple[int, int]) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(
        image_size=size, patch_size=2, embed_dim=8, depths=[2, 2, 2], num_heads=[1, 1, 2],
        window_size=4, num_labels=4,
    )  # fmt: skip
    model = transformers.SwinForImageClassification(cfg)
    layers = [f"swin.encoder.layers.{i}.blocks.1[0]" for i in range(3)]
    check_model(
        model, (3, *size), layers, CORNERS, pick=_hf_block, forward_fn=_pixels, token_layout=None
    )


def _pixels(m: nn.Module, x: torch.Tensor) -> Any:
    return m(pixel_values=x)


def _hf_block(out: Any, idx: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    return tokens_first(out, idx, grid)


# ----------------------------------------------------------------------------- tracer


class AddInPlace(nn.Module):
    """``a.add_(b)`` and then ``a``: the later use must read the sum (b's wider field)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 5, padding=2)
        self.out = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        a.add_(self.b(x))
        return self.out(a).permute(0, 2, 3, 1)


def test_in_place_ops_rebind_their_tensor() -> None:
    done = check_model(nn.Sequential(AddInPlace()), (3, 11, 11), ["0"], [(None, None), (0, 0)])
    assert [trf.clipped for *_, trf, _ in done] == [((3, 7), (3, 7)), ((0, 2), (0, 2))]


class WritesInput(nn.Module):
    """``y[:, :, 0] = x[:, :, -1]``: an assignment into a tensor (fx's proxies refuse it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[:, :, 0] = x[:, :, -1]
        return self.a(y)


class WritesConstant(nn.Module):
    """The input written into a tensor built from its shape: the tracer refuses it (the
    constant would silently lose the dependence)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_zeros(x.shape)
        y[:, :, 1:] = x[:, :, :-1]
        return self.a(y)


def test_assignments_fall_back_to_the_numeric_method() -> None:
    for net, why in ((WritesInput(), "item assignment"), (WritesConstant(), "in place")):
        with pytest.raises(ValueError, match=why):
            em.theoretical_rf(net, (3, 8, 8), ["a"], method="fx")
    with pytest.warns(em.ERFProbeWarning, match="numeric"):  # a field at the border
        trf = em.theoretical_rf(WritesInput(), (3, 8, 8), ["a"], position=(0, 0))["a"]
    # Rows 0..1 of y are rows 7 and 1 of x (row 0 of x is overwritten, never read).
    assert trf.method == "numeric" and trf.clipped == ((1, 7), (0, 1))
    trf = em.theoretical_rf(WritesConstant(), (3, 8, 8), ["a"])["a"]  # inside: exact, quiet
    assert trf.method == "numeric" and trf.clipped == ((2, 4), (3, 5))  # rows moved down by 1
