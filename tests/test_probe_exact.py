"""Numbers that never lie: every map equals probing its layer alone, every stream is restored,
bad inputs are refused, and a TRF that the map contradicts is not used (issue 9).

References are written here plainly: one layer and one image at a time, a full forward and an
input-only backward each, with nothing after the layer run (the forward stops in the hook).
"""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import erf_monitor as em
from references import one_layer_reference

# ----------------------------------------------------------------------------- 1: in-place ops


def inplace_stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=True),
    )


@pytest.mark.parametrize("crop", [False, True, "auto"])
@pytest.mark.parametrize("mode", ["luo", "replknet"])
def test_inplace_relu_after_a_watched_layer(crop: bool | str, mode: str) -> None:
    net = inplace_stack()
    x = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    together = em.compute_erf(net, x, ["2", "4"], crop=crop, mode=mode)  # type: ignore[arg-type]
    for name in ("2", "4"):
        alone = em.compute_erf(net, x, [name], crop=crop, mode=mode)  # type: ignore[arg-type]
        torch.testing.assert_close(together[name].heatmap, alone[name].heatmap, rtol=0, atol=0)
    if mode == "luo":
        ref = one_layer_reference(net, x, "2")
        torch.testing.assert_close(together["2"].heatmap, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("crop", [False, True])
def test_resnet_block_inplace_add_with_a_deeper_layer(crop: bool) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    layers = ["layer2.1.bn2", "layer4"]
    together = em.compute_erf(model, x, layers, crop=crop)
    alone = em.compute_erf(model, x, ["layer2.1.bn2"], crop=crop)
    torch.testing.assert_close(
        together["layer2.1.bn2"].heatmap, alone["layer2.1.bn2"].heatmap, rtol=1e-6, atol=0
    )
    ref = one_layer_reference(model, x, "layer2.1.bn2")
    torch.testing.assert_close(together["layer2.1.bn2"].heatmap, ref, rtol=1e-4, atol=1e-8)


class SavesItsOutput(nn.Module):
    """A sigmoid whose backward needs its output, which the forward then changes in place
    (as feature code run under ``no_grad`` in training may); a second branch comes after."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.Sigmoid()
        self.conv2 = nn.Conv2d(3, 4, 5, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv(x))
        a.mul_(2.0)  # autograd's version counter: act's saved output was modified
        return a + self.conv2(x)


def test_layer_whose_saved_output_is_modified_in_place_is_probed_alone() -> None:
    torch.manual_seed(0)
    net = SavesItsOutput()
    x = torch.randn(2, 3, 12, 12)
    for crop in (False, True):
        res = em.compute_erf(net, x, ["act", "conv2"], crop=crop)
        for name in ("act", "conv2"):
            ref = one_layer_reference(net, x, name)
            torch.testing.assert_close(res[name].heatmap, ref, rtol=1e-5, atol=1e-8)


class BrokenBackward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.Sigmoid()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        y.mul_(2.0)  # every gradient through here is refused by autograd
        return self.conv2(y)


def test_a_backward_autograd_refuses_is_an_error_naming_the_layer() -> None:
    net = BrokenBackward()
    with pytest.raises(em.ERFProbeError, match=r"'conv2'.*inplace"):
        em.compute_erf(net, torch.randn(2, 3, 8, 8), ["conv2"])


class NormalisesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.sub_(0.5)  # in place on the input, as some preprocessing does
        return self.conv(x)


def test_model_that_modifies_its_input_in_place() -> None:
    torch.manual_seed(0)
    net = NormalisesItsInput()
    x = torch.randn(2, 3, 10, 10)
    before = x.clone()
    res = em.compute_erf(net, x, ["conv"])
    assert torch.equal(x, before)
    # One linear layer: the gradient w.r.t. x[c] at tap t is sum_k w[k, c, t] (flipped onto
    # the input around the centre pixel; the kernel is 3 x 3, so rows 4..6, columns 4..6).
    expected = torch.zeros(10, 10)
    expected[4:7, 4:7] = net.conv.weight.detach().sum(0).abs().sum(0)
    torch.testing.assert_close(res["conv"].heatmap, expected, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- 2: RNG streams


class DrawsEverywhere(nn.Module):
    """Stochastic depth drawn as ``random.random() < p and self.training`` (the draw happens in
    eval mode too), NumPy noise, and a torch op fx has no rule for (numeric TRF fallback)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if random.random() < 0.5 and self.training:
            y = y * 0
        y = y * float(1 + 0 * np.random.rand()) + 0 * torch.rand(1, device=y.device)
        return self.conv2(y)


def rng_states() -> tuple[object, ...]:
    return random.getstate(), np.random.get_state()[1].tobytes(), torch.get_rng_state()


def assert_same_rng(a: tuple[object, ...], b: tuple[object, ...]) -> None:
    assert a[0] == b[0], "Python random advanced"
    assert a[1] == b[1], "NumPy's global generator advanced"
    assert torch.equal(a[2], b[2]), "torch's CPU generator advanced"  # type: ignore[arg-type]


@pytest.mark.parametrize("trf", ["auto", "skip"])
@pytest.mark.parametrize("layers", [["conv2"], "auto"])
def test_compute_erf_leaves_every_rng_stream(trf: str, layers: object) -> None:
    net = DrawsEverywhere()
    x = torch.randn(2, 3, 12, 12)
    before = rng_states()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.ERFProbeWarning)  # the numeric fallback
        em.compute_erf(net, x, layers, trf=trf)  # type: ignore[arg-type]
    assert_same_rng(before, rng_states())


def test_theoretical_rf_leaves_every_rng_stream() -> None:
    net = DrawsEverywhere()
    for method in ("auto", "numeric"):
        before = rng_states()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", em.ERFProbeWarning)
            trf = em.theoretical_rf(net, (3, 12, 12), ["conv2"], method=method)  # type: ignore[arg-type]
        assert trf["conv2"].size == (5.0, 5.0)
        assert_same_rng(before, rng_states())


def test_rng_restored_when_the_probe_fails() -> None:
    net = DrawsEverywhere()
    x, bad = torch.randn(1, 3, 12, 12), torch.randn(1, 2, 8, 8)  # bad: 2 channels
    before = rng_states()
    with pytest.raises(ValueError):
        em.compute_erf(net, x, ["conv2", "nope"])
    with pytest.raises(em.ERFProbeError), warnings.catch_warnings():
        warnings.simplefilter("ignore", em.ERFProbeWarning)
        em.compute_erf(net, bad, ["conv2"], trf="skip")
    assert_same_rng(before, rng_states())


# ----------------------------------------------------------------------------- 4: centres


def strided_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),  # unit i sees 2i - 1 .. 2i + 1
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
    )


def test_metrics_do_not_depend_on_whether_the_trf_was_analysed() -> None:
    net = strided_net()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    auto = em.compute_erf(net, x, ["2", "4"])
    skip = em.compute_erf(net, x, ["2", "4"], trf="skip")
    for name in ("2", "4"):
        a, s = auto[name], skip[name]
        assert s.trf is None and a.trf is not None
        # Centre unit 8 of 16 (stride 2, padding 1): its field is centred on input pixel 16
        # (layer "2": pixels 13..19 through the first 3x3; layer "4": 12..20).
        assert a.theoretical_centre == s.theoretical_centre == (16.0, 16.0)
        assert a.centre_pixel == s.centre_pixel == (16, 16)
        assert a.erf_size == s.erf_size
        assert a.coverage == s.coverage
        assert a.centroid_offset == s.centroid_offset
        assert a.scalars()["sigma_x"] == s.scalars()["sigma_x"]


def test_compiled_forward_instance_attribute_is_analysed() -> None:
    """``Trainer.fit(torch.compile(module))`` leaves a dynamo-compiled ``forward`` on the module
    instance; the TRF analysis (fx and numeric) must run the eager one instead."""
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.utilities.compile import from_compiled

    class Module(lightning.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = strided_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    module = from_compiled(torch.compile(Module()))
    assert "forward" in vars(module)  # what Lightning does
    compiled_forward = vars(module)["forward"]
    for method in ("fx", "numeric"):
        trf = em.theoretical_rf(module, (3, 32, 32), ["net.4"], method=method)  # type: ignore[arg-type]
        assert trf["net.4"].size == (9.0, 9.0) and trf["net.4"].centre == (16.0, 16.0)
    assert vars(module)["forward"] is compiled_forward  # put back


# ----------------------------------------------------------------------------- 5: NaN / Inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_refused(bad: float) -> None:
    net = strided_net()
    x = torch.randn(3, 3, 16, 16)
    x[1, 2, 5, 7] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf.*sample\(s\) 1"):
        em.compute_erf(net, x, ["2"])
    # float16 probes: a finite float32 value that overflows the probe dtype is refused too.
    big = torch.full((1, 3, 8, 8), 1e6)
    with pytest.raises(ValueError, match="NaN or Inf"):
        em.compute_erf(net.half(), big, ["2"], trf="skip", crop=False, dtype=torch.float16)


def test_monitor_warns_once_and_skips_probes_of_a_non_finite_batch() -> None:
    net = strided_net()
    x = torch.randn(4, 3, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    w = em.watch(net, layers=["2"], every_n_steps=1, probe_inputs=x, min_coverage=None)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        results = [w.step() for _ in range(3)]
    assert results == [None, None, None] and w.history == {}
    probe_warnings = [r for r in rec if issubclass(r.category, em.ERFProbeWarning)]
    assert len(probe_warnings) == 1 and "NaN or Inf" in str(probe_warnings[0].message)


# ----------------------------------------------------------------------------- 7: sampling


def test_data_dependent_trf_is_reported_everywhere_without_a_finite_box() -> None:
    tv_ops = pytest.importorskip("torchvision.ops")
    from erf_monitor.cli.display import trf_text
    from erf_monitor.cli.records import result_record
    from erf_monitor.viz.render import _panel_title, render_heatmap

    class Deformable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.offsets = nn.Conv2d(3, 18, 3, padding=1)
            nn.init.normal_(self.offsets.weight, std=2.0)  # large, data-dependent offsets
            self.dc = tv_ops.DeformConv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dc(x, self.offsets(x))

    torch.manual_seed(0)
    net = Deformable()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    r = em.compute_erf(net, x, ["dc"])["dc"]
    assert r.trf is not None and r.trf.data_dependent and "deform_conv2d" in r.trf.reason
    support = (r.heatmap > 0).nonzero()
    assert int(support[:, 1].max() - support[:, 1].min()) + 1 > 4  # wider than any 3x3 + 1
    scalars = r.scalars()
    assert scalars["trf_data_dependent"] == 1.0 and scalars["trf_global"] == 1.0
    assert "trf_size" not in scalars and "trf_size_clipped" not in scalars
    assert r.ratio == r.erf_size / 32  # like a global field: against the whole input
    assert "data-dependent" in repr(r) and "data-dependent" in _panel_title(r)
    assert trf_text(r) == ("data-dependent", "-")
    record = result_record(r)["trf"]
    assert record["data_dependent"] and "clipped" not in record
    # No TRF box is drawn: the image is the same as without any TRF outline.
    assert np.array_equal(render_heatmap(r, draw_trf=True), render_heatmap(r, draw_trf=False))


# ----------------------------------------------------------------------------- 8: consistency


def test_mass_outside_a_finite_trf_marks_it_unknown_with_one_warning() -> None:
    net = strided_net()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    right = em.theoretical_rf(net, (3, 32, 32), ["0", "4"])
    # A wrong analysis: layer "4" (9 x 9 field) given the 3 x 3 field of layer "0" ... placed
    # on layer 4's grid so that it looks like a TRF of that unit.
    from dataclasses import replace

    wrong = replace(
        right["0"], output_shape=right["4"].output_shape, output_centre=right["4"].output_centre
    )
    plain = em.compute_erf(net, x, ["4"], trf="skip", crop=False)["4"]
    for crop in (False, True):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            r = em.compute_erf(net, x, ["4"], trf={"4": wrong}, crop=crop)["4"]
        mine = [str(w.message) for w in rec if "outside the clipped TRF" in str(w.message)]
        assert len(mine) == 1 and "'4'" in mine[0]
        # The amount: the map's mass outside rows/cols 15..17, computed here.
        inside = plain.heatmap[15:18, 15:18].double().sum() / plain.heatmap.double().sum()
        assert f"{1 - float(inside):.3g}" in mine[0]
        assert r.trf is None and r.trf_issue is not None and math.isnan(r.ratio)
        torch.testing.assert_close(r.heatmap, plain.heatmap, rtol=1e-6, atol=0)
    # A right TRF is never questioned.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = em.compute_erf(net, x, ["4"], trf={"4": right["4"]})["4"]
    assert ok.trf == right["4"] and ok.trf_issue is None


def test_monitor_stops_using_a_contradicted_trf(monkeypatch: pytest.MonkeyPatch) -> None:
    import erf_monitor.trf.analysis as trf_module

    net = strided_net()
    real = trf_module.theoretical_rfs

    def buggy(*args: object, **kwargs: object) -> dict[str, dict[str, em.TRF]]:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        from dataclasses import replace

        t = out["4"]["centre"]
        return {"4": {"centre": replace(t, clipped=((16, 16), (16, 16)), size=(1.0, 1.0))}}

    monkeypatch.setattr(trf_module, "theoretical_rfs", buggy)
    x = torch.randn(4, 3, 32, 32)
    w = em.watch(net, layers=["4"], every_n_steps=1, probe_inputs=x, min_coverage=None)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            w.step()
    mine = [r for r in rec if "outside the clipped TRF" in str(r.message)]
    assert len(mine) == 1
    assert not [r for r in rec if "geometry" in str(r.message) or "cropping" in str(r.message)]
    history = list(w.history["4"].values())
    assert all(math.isnan(v["erf_trf_ratio"]) for v in history)
    assert all("trf_size_clipped" not in v for v in history)
    assert all(v == history[0] for v in history)  # same centre, same numbers every probe
