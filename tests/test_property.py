"""Property test: random small architectures, every promise at once.

A seeded generator builds a few hundred small CNNs (random depth, kernel sizes including even
ones, strides, dilations, paddings and padding modes, in-place activations, residual blocks
with an in-place ``+=``, concatenations, max/avg pooling with ``ceil_mode``, BatchNorm) and
probes 1 to 3 random layers (top-level blocks or modules inside them) in a random mode, with
or without cropping, at a random position (the centre, an output index, negative or not, a
fraction of the output plane, corners, edges or a small grid). For every case:

* every layer's map equals a slow reference written here: one layer and one image at a time,
  a forward stopped inside the layer's hook, an input-only backward, the mode's reduction,
  at the seeded unit (for sets: the centre, a corner and a random position of the set);
* the map's support lies inside the reported clipped TRF (and the TRF is not contradicted);
* torch's, Python's and NumPy's random streams are unchanged;
* the model is unchanged: parameters, buffers, every ``training`` flag, no ``.grad``, no hook.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import erf_monitor as em

CASES = 500


# ----------------------------------------------------------------------------- blocks


class Residual(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int, dilation: int, inplace: bool):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, k, stride, padding=dilation * (k // 2), dilation=dilation),
            nn.ReLU(inplace=inplace),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        same = stride == 1 and c_in == c_out
        self.skip = nn.Identity() if same else nn.Conv2d(c_in, c_out, 1, stride)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.inplace:
            out += self.skip(x)
            return torch.relu_(out)
        return torch.relu(out + self.skip(x))


class Concat(nn.Module):
    def __init__(self, c_in: int, c_a: int, c_b: int, k_a: int, k_b: int, d_b: int):
        super().__init__()
        self.a = nn.Conv2d(c_in, c_a, k_a, padding=k_a // 2)
        self.b = nn.Conv2d(c_in, c_b, k_b, padding=d_b * (k_b // 2), dilation=d_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


def _conv(rng: random.Random, c_in: int) -> tuple[nn.Module, int]:
    k = rng.randint(1, 5)
    d = rng.choice([1, 1, 1, 2, 3]) if k > 1 else 1
    s = rng.choice([1, 1, 1, 2, 3])
    p = rng.randint(0, d * (k - 1))
    mode = rng.choice(["zeros"] * 6 + ["reflect", "replicate", "circular"]) if p else "zeros"
    c_out = rng.randint(1, 4)
    conv = nn.Conv2d(c_in, c_out, k, s, p, d, padding_mode=mode, bias=rng.random() < 0.7)
    return conv, c_out


def _block(rng: random.Random, c_in: int) -> tuple[nn.Module, int]:
    kind = rng.choice(["conv"] * 4 + ["act", "residual", "concat", "pool", "bn"])
    if kind == "conv":
        return _conv(rng, c_in)
    if kind == "act":
        inplace = rng.random() < 0.6
        act = rng.choice(
            [nn.ReLU(inplace=inplace), nn.LeakyReLU(0.1, inplace=inplace), nn.Tanh(), nn.GELU()]
        )
        return act, c_in
    if kind == "residual":
        c_out = rng.randint(1, 4)
        k = rng.choice([1, 3, 5])
        d = rng.choice([1, 2]) if k > 1 else 1
        block = Residual(c_in, c_out, k, rng.choice([1, 1, 2]), d, rng.random() < 0.7)
        return block, c_out
    if kind == "concat":
        c_a, c_b = rng.randint(1, 3), rng.randint(1, 3)
        block = Concat(c_in, c_a, c_b, rng.choice([1, 3]), rng.choice([3, 5]), rng.choice([1, 2]))
        return block, c_a + c_b
    if kind == "pool":
        k = rng.randint(2, 3)
        s = rng.randint(1, 3)
        p = rng.randint(0, k // 2)
        ceil = rng.random() < 0.5
        if rng.random() < 0.5:
            return nn.MaxPool2d(k, s, p, dilation=rng.choice([1, 2]), ceil_mode=ceil), c_in
        return nn.AvgPool2d(k, s, p, ceil_mode=ceil, count_include_pad=rng.random() < 0.5), c_in
    bn = nn.BatchNorm2d(c_in)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
    return bn, c_in


def trainable(model: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether the model makes sense: finite outputs (a max-pooling window that lies entirely
    in the padding gives -inf, and its backward corrupts memory in torch 2.x), and a plain
    backward works (two in-place activations in a row do not: the second modifies what the
    first one's backward needs)."""
    x = torch.randn(shape)
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.clone())
        if min(out.shape[2:]) < 1 or not bool(torch.isfinite(out).all()):
            return False
        x.requires_grad_(True)
        model(x.clone()).sum().backward()
    except RuntimeError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
    return True


@dataclass
class Case:
    model: nn.Sequential
    x: torch.Tensor
    layers: list[str]
    mode: str
    crop: bool | str
    position: object = "centre"


def output_grids(model: nn.Module, x: torch.Tensor, layers: list[str]) -> list[tuple[int, ...]]:
    """Spatial output shape of each layer's first call (eval mode, flags restored)."""
    grids: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())
    flags = [(m, m.training) for m in model.modules()]

    def hook(name: str) -> object:
        def fn(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            grids.setdefault(name, tuple(out.shape[2:]))  # returns None: output unchanged

        return fn

    handles = [modules[name].register_forward_hook(hook(name)) for name in layers]  # type: ignore[arg-type]
    try:
        model.eval()
        with torch.no_grad():
            model(x[:1].clone())
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    return [grids[name] for name in layers]


def random_position(rng: random.Random, grids: list[tuple[int, ...]]) -> object:
    """A position valid on every grid (indices within the smallest one, negative or not)."""
    kind = rng.choice(["centre"] * 3 + ["index", "fraction", "corners", "edges", "grid", "list"])
    if kind in ("centre", "corners", "edges"):
        return kind
    if kind == "grid":
        return rng.choice([f"grid:{rng.randint(2, 3)}", ("grid", 2)])
    small = [min(g[d] for g in grids) for d in range(2)]

    def one() -> tuple[int | float, ...]:
        if kind == "fraction" or rng.random() < 0.3:
            return tuple(rng.choice([0.0, 1.0, rng.random()]) for _ in range(2))
        return tuple(rng.randint(-s, s - 1) for s in small)

    if kind == "list":
        return list(dict.fromkeys([one(), one()]))
    return one()


def make_case(seed: int) -> Case:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c = rng.randint(1, 3)
    shape = (rng.randint(1, 3), c, rng.randint(8, 24), rng.randint(8, 24))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    blocks: list[nn.Module] = []
    probe = torch.zeros(1, *shape[1:])
    for _ in range(rng.randint(1, 7)):
        for _attempt in range(20):
            block, c_out = _block(rng, c)
            if not trainable(nn.Sequential(*blocks, block), shape):
                continue  # e.g. a kernel larger than the input, or in-place after in-place
            with torch.no_grad():
                out = block.eval()(probe.clone())
            blocks.append(block)
            probe, c = out, c_out
            break
    if not blocks:
        blocks.append(nn.Conv2d(c, 2, 1))
    model = nn.Sequential(*blocks)
    names = [n for n, _ in model.named_modules() if n]
    layers = rng.sample(names, k=min(len(names), rng.randint(1, 3)))
    mode = rng.choice(["luo", "luo", "replknet", "openerf"])
    crop = rng.choice([False, True, "auto"])
    model.train(rng.random() < 0.5)  # the probe runs in eval mode and restores the flags
    # Its own generator: the architectures stay those of the seeds before positions existed.
    position = random_position(random.Random(seed + 1_000_003), output_grids(model, x, layers))
    return Case(model, x, layers, mode, crop, position)


# ----------------------------------------------------------------------------- reference


class _Stop(Exception):
    pass


def reference(
    model: nn.Module,
    x: torch.Tensor,
    layer: str,
    mode: str,
    index: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """The mode's map of output unit ``index`` (default: the centre unit ``S' // 2``), one
    image at a time, the forward stopped in the layer's hook."""
    module = dict(model.named_modules())[layer]
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    total = torch.zeros(x.shape[2:], dtype=torch.float64)
    try:
        for n in range(x.shape[0]):
            xi = x[n : n + 1].clone().requires_grad_(True)
            seeds: list[torch.Tensor] = []

            def hook(_m: nn.Module, _i: object, out: torch.Tensor, seeds: list = seeds) -> None:
                at = tuple(s // 2 for s in out.shape[2:]) if index is None else index
                unit = out[(0, slice(None), *at)]
                if mode == "replknet":
                    seeds.append(torch.relu(unit).sum())
                elif mode == "openerf":
                    seeds.append(unit.mean())
                else:
                    seeds.append(unit.sum())
                raise _Stop

            handle = module.register_forward_hook(hook)
            try:
                model(xi.clone())
            except _Stop:
                pass
            finally:
                handle.remove()
            (g,) = torch.autograd.grad(seeds[0], xi, allow_unused=True)
            g = torch.zeros_like(xi) if g is None else g
            g = g[0].double()
            if mode == "replknet":
                total += g.clamp(min=0).sum(0)
            elif mode == "openerf":
                total += g.mean(0).clamp(min=0)
            else:
                total += g.abs().sum(0)
    finally:
        for m, flag in flags:
            m.training = flag
    if mode == "replknet":
        logged = torch.log10(total / x.shape[0] + 1)
        return (logged / logged.max() if logged.max() > 0 else logged).float()
    if mode == "openerf":
        return (total / total.sum() if total.sum() > 0 else total).float()
    return (total / x.shape[0]).float()


# ----------------------------------------------------------------------------- the property


def snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "flags": [m.training for m in model.modules()],
        "rng": (random.getstate(), np.random.get_state()[1].tobytes(), torch.get_rng_state()),
    }


def assert_untouched(model: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(model)
    state = before["state"]
    assert isinstance(state, dict)
    for k, v in after["state"].items():  # type: ignore[union-attr]
        assert torch.equal(v, state[k]), f"{k} changed"
    assert after["flags"] == before["flags"], "a training flag changed"
    rng_a, rng_b = after["rng"], before["rng"]
    assert rng_a[0] == rng_b[0], "Python random advanced"  # type: ignore[index]
    assert rng_a[1] == rng_b[1], "NumPy's generator advanced"  # type: ignore[index]
    assert torch.equal(rng_a[2], rng_b[2]), "torch's generator advanced"  # type: ignore[index]
    for name, m in model.named_modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), name
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("seed", range(CASES))
def test_random_architecture(seed: int) -> None:
    case = make_case(seed)
    before = snapshot(case.model)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = em.compute_erf(
            case.model, case.x, case.layers, mode=case.mode, crop=case.crop,  # type: ignore[arg-type]
            position=case.position,  # type: ignore[arg-type]
        )  # fmt: skip
    assert_untouched(case.model, before)
    messages = [str(w.message) for w in rec]
    assert not [m for m in messages if "outside the clipped TRF" in m or "cropping" in m], messages
    pick = random.Random(seed)
    for name in case.layers:
        field = res[name].field
        checked = [res[name]]
        if field is not None:  # the centre, a corner and one more position of the set
            others = [r for key, r in field.items() if key != "centre"]
            corners = field.corners or others
            checked += [pick.choice(corners), pick.choice(others)]
        for r in checked:
            what = (name, r.position, r.output_index)
            index = None if r.position == "centre" else r.output_index
            ref = reference(case.model, case.x, name, case.mode, index)
            scale = float(ref.abs().max()) or 1.0
            torch.testing.assert_close(r.heatmap, ref, rtol=1e-4, atol=1e-5 * scale, msg=str(what))
            assert r.trf is not None and r.trf_issue is None, what
            assert tuple(r.trf.output_centre) == r.output_index, what
            if not r.trf.is_global:
                box = torch.zeros_like(r.heatmap, dtype=torch.bool)
                (r0, r1), (c0, c1) = r.trf.clipped
                box[r0 : r1 + 1, c0 : c1 + 1] = True
                assert not bool((r.heatmap > 0)[~box].any()), (what, r.trf)
