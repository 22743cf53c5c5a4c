"""ERF anywhere (issue 13): any output unit, sets of units in one probe, border effects.

Known answers are derived here: an all-ones convolution stack with zero padding has, at any
output unit, a separable map whose per-axis profile is the *truncated* box convolution (the
padding is zero: a path through it carries nothing); every other number is checked against a
slow one-unit-one-image reference or against the plain (uncropped, unpacked) probe.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import erf_monitor as em
from erf_monitor.probe import seeds as _seeds
from erf_monitor.probe.crop import plan_groups
from erf_monitor.sinks._tensorboard import key_from_tag, tb_tag
from erf_monitor.targets.positions import parse_position_text, request
from erf_monitor.trf.analysis import theoretical_rfs
from references import one_layer_reference

# ----------------------------------------------------------------------------- helpers


def ones_stack(n: int = 3, k: int = 3) -> nn.Sequential:
    convs = [nn.Conv2d(1, 1, k, padding=k // 2, bias=False) for _ in range(n)]
    for c in convs:
        nn.init.ones_(c.weight)
    return nn.Sequential(*convs)


def truncated_box(size: int, start: int, n: int, k: int) -> np.ndarray:
    """Per-axis profile of output unit ``start`` after ``n`` all-ones convs of width ``k``
    with zero padding ``k // 2``: ``v <- box(v)`` restricted to ``[0, size)`` at each layer
    (a unit reads the in-bounds inputs within ``k // 2`` of it; padding contributes nothing).
    """
    v = np.zeros(size)
    v[start] = 1.0
    r = k // 2
    for _ in range(n):
        nxt = np.zeros(size)
        for p in range(size):
            nxt[p] = v[max(0, p - r) : min(size, p + r + 1)].sum()
        v = nxt
    return v


def strided_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
    )


def quiet_probe(*args: object, **kwargs: object) -> em.ERFResults:
    with warnings.catch_warnings():
        warnings.simplefilter("error", em.ERFProbeWarning)  # no fallback, no wrong TRF
        return em.compute_erf(*args, **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- parsing


def test_position_keys_and_indices() -> None:
    assert [p.key for p in request("edges", 2).positions] == [
        "edge_top", "edge_bottom", "edge_left", "edge_right",
    ]  # fmt: skip
    corners = request("corners", 2).positions
    assert [p.index((6, 9)) for p in corners] == [(0, 0), (0, 8), (5, 0), (5, 8)]
    grid = request(("grid", 5), 2)
    assert grid.grid == (5, 5) and len(grid.positions) == 25 and grid.probed[0].key == "centre"
    # floor(i * (S' - 1) / (k - 1) + 1/2): 0, 4, 8, 11, 15 on 16 units; the middle is S' // 2
    assert [p.index((16, 16))[1] for p in grid.positions[:5]] == [0, 4, 8, 11, 15]
    assert request("grid:5", 2).positions == grid.positions
    assert request("grid:1", 2).positions[0].index((7, 8)) == (3, 4)
    # Fractions: min(floor(f * S'), S' - 1); 0.5 is the centre unit S' // 2.
    frac = request((0.0, 0.5), 2).positions[0]
    assert frac.key == "y0pct_x50pct" and frac.index((7, 8)) == (0, 4)
    assert request((1.0, 0.125), 2).positions[0].key == "y100pct_x12p5pct"
    assert request((1.0, 0.125), 2).positions[0].index((7, 8)) == (6, 1)
    single = request((3, -1), 2)
    assert not single.is_set and single.primary.key == "y3_x-1"
    assert single.positions[0].index((5, 5)) == (3, 4)
    many = request([(0, 0), "centre", (0.5, 0.25)], 2)
    assert [p.key for p in many.probed] == ["y0_x0", "centre", "y50pct_x25pct"]
    assert next(p.key for p in request("corners", 3).positions) == "corner_front_top_left"
    assert parse_position_text("grid:3") == "grid:3"
    assert parse_position_text("2, -1") == (2, -1)
    assert parse_position_text("0.25,1.0;centre") == [(0.25, 1.0), "centre"]


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ((0.5, 1.5), ValueError, r"fraction.*\[0, 1\]"),
        ((0, 0, 0), ValueError, "3 entries but the input has 2"),
        ("grid:0", ValueError, "grid size k"),
        ("grid:x", ValueError, "grid:k"),
        (("grid", 2.5), TypeError, "must be an int"),
        ("middle", ValueError, "position must be"),
        ([(0, 0), (0, 0)], ValueError, "more than once"),
        ([(0, 0), "grid:3"], TypeError, "every item"),
        ((True, 0), TypeError, "every item"),
    ],
)
def test_bad_positions_are_refused_with_what_is_accepted(
    spec: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        request(spec, 2)
    with pytest.raises(error, match=match):
        em.compute_erf(strided_net(), torch.randn(1, 3, 8, 8), ["0"], position=spec)  # type: ignore[arg-type]


def test_an_index_outside_a_layer_grid_names_the_layer_and_its_grid() -> None:
    net = strided_net()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"layer '2'.*output index 8.*\(8, 8\).*-8 \.\. 7"):
        em.compute_erf(net, x, ["0", "2"], position=(8, 0))
    # The same index is fine on the full-resolution layer, and a fraction fits both.
    assert em.compute_erf(net, x, ["0"], position=(8, 0))["0"].output_index == (8, 0)
    res = em.compute_erf(net, x, ["0", "2"], position=(1.0, 0.0))
    assert res["0"].output_index == (15, 0) and res["2"].output_index == (7, 0)


def test_an_output_without_a_grid_has_only_a_centre() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="no spatial grid"):
        em.compute_erf(net, x, ["2"], position=(0, 0))
    assert em.compute_erf(net, x, ["2"], position="centre")["2"].position == "centre"


def test_options_validate_the_position_at_construction() -> None:
    assert em.MonitorOptions(position="grid:3").position == "grid:3"
    assert em.MonitorOptions(position=[(0, 0), (1.0, 1.0)]).position == ((0, 0), (1.0, 1.0))
    with pytest.raises(ValueError, match="position must be"):
        em.MonitorOptions(position="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="position must be"):
        em.watch(strided_net(), position="top")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- exact answers


def test_corner_of_an_all_ones_stack_is_the_truncated_box_convolution() -> None:
    n, k, h, w = 3, 3, 12, 15
    net = ones_stack(n, k)
    x = torch.randn(2, 1, h, w, generator=torch.Generator().manual_seed(0))
    for position, (iy, ix) in [
        ((0, 0), (0, 0)),
        ((-1, -1), (h - 1, w - 1)),
        ((0, 0.5), (0, w // 2)),
        ((1.0, 0.0), (h - 1, 0)),
        ((4, 9), (4, 9)),
    ]:
        r = em.compute_erf(net, x, ["2"], position=position)["2"]  # type: ignore[arg-type]
        expected = np.outer(truncated_box(h, iy, n, k), truncated_box(w, ix, n, k))
        np.testing.assert_allclose(r.heatmap.numpy(), expected, rtol=1e-6)
        assert r.output_index == (iy, ix)
        # The unit's field is centred on its own pixel (stride 1): metrics are measured there.
        assert r.theoretical_centre == (float(iy), float(ix))
        assert r.centre_pixel == (iy, ix)
        # TRF of that unit: n (k - 1) + 1 wide, unclipped around it, clipped to the image.
        assert r.trf is not None
        assert r.trf.interval == ((iy - 3, iy + 3), (ix - 3, ix + 3))
        assert r.trf.clipped == ((max(iy - 3, 0), min(iy + 3, h - 1)),
                                 (max(ix - 3, 0), min(ix + 3, w - 1)))  # fmt: skip


def test_negative_indices_and_fractions_agree_with_the_positive_index() -> None:
    net = strided_net()
    x = torch.randn(3, 3, 20, 18, generator=torch.Generator().manual_seed(1))
    # Layer "2": a 10 x 9 grid.
    pairs = [((-1, -1), (9, 8)), ((1.0, 1.0), (9, 8)), ((0.5, 0.0), (5, 0)), ((-10, 0.5), (0, 4))]
    for spec, index in pairs:
        a = em.compute_erf(net, x, ["2", "4"], position=spec)  # type: ignore[arg-type]
        b = em.compute_erf(net, x, ["2", "4"], position=index)
        for name in ("2", "4"):
            assert a[name].output_index == b[name].output_index == index
            torch.testing.assert_close(a[name].heatmap, b[name].heatmap, rtol=0, atol=0)
            assert a[name].scalars() == b[name].scalars()
            assert a[name].trf == b[name].trf
    last = em.compute_erf(net, x, ["4"], position=(-1, -1))["4"]
    ref = one_layer_reference(net, x, "4", (9, 8))
    torch.testing.assert_close(last.heatmap, ref, rtol=1e-5, atol=1e-7)


def test_theoretical_rf_at_a_position_matches_the_derivation() -> None:
    net = strided_net()
    # Layer "4" unit (0, 0): conv p1 reads units -1..1 of "2" (-1 is padding), whose stride-2
    # conv reads -3..3 of "0", which reads -4..4 of the input: clipped 0..4 (only in-bounds
    # units of each layer carry anything: units 0..1 of "2" read inputs of "0" -1..3 -> 0..3,
    # which read 0..4).
    trf = em.theoretical_rf(net, (3, 32, 32), ["4"], position=(0, 0))["4"]
    assert trf.interval == ((-4, 4), (-4, 4)) and trf.clipped == ((0, 4), (0, 4))
    assert trf.centre == (0.0, 0.0) and trf.output_centre == (0, 0)
    last = em.theoretical_rf(net, (3, 32, 32), ["4"], position=(-1, -1))["4"]
    assert last.output_centre == (15, 15) and last.interval == ((26, 34), (26, 34))
    assert last.clipped == ((26, 31), (26, 31)) and last.centre == (30.0, 30.0)
    numeric = em.theoretical_rf(net, (3, 32, 32), ["4"], position=(-1, -1), method="numeric")
    assert numeric["4"].clipped == last.clipped and numeric["4"].stride == (2.0, 2.0)
    with pytest.raises(ValueError, match="one position"):
        em.theoretical_rf(net, (3, 32, 32), ["4"], position="corners")


# ----------------------------------------------------------------------------- sets, cropping


def test_a_grid_equals_separate_probes_and_the_reference_at_every_position() -> None:
    net = strided_net()
    x = torch.randn(2, 3, 24, 20, generator=torch.Generator().manual_seed(2))
    res = quiet_probe(net, x, ["2", "4"], position="grid:3")
    for name in ("2", "4"):
        field = res[name].field
        assert field is not None and res[name] is field.centre
        assert next(iter(field)) == "centre" and len(field) == 10
        for key, r in field.items():
            ref = one_layer_reference(net, x, name, r.output_index)
            torch.testing.assert_close(r.heatmap, ref, rtol=1e-5, atol=1e-7, msg=key)
            alone = quiet_probe(net, x, [name], position=r.output_index)[name]
            torch.testing.assert_close(r.heatmap, alone.heatmap, rtol=1e-6, atol=1e-8)
            assert r.trf == alone.trf and r.centre_pixel == alone.centre_pixel
            assert r.position == key and r.name == name
    # The keys of every position (other than the centre) are "<layer>/<position>".
    keys = res.scalars()
    assert "4" in keys and "4/grid3_y0_x2" in keys and "border_ratio" in keys["4"]
    assert set(res.flat()) == set(keys)


@pytest.mark.parametrize("mode", ["luo", "replknet", "openerf"])
def test_cropped_equals_uncropped_at_every_position_of_a_grid(mode: str) -> None:
    net = strided_net()
    x = torch.randn(3, 3, 40, 36, generator=torch.Generator().manual_seed(3))
    layers = ["2", "4"]
    # crop=True really gives each position its own window (and windows differ).
    trfs = theoretical_rfs(net, (3, 40, 36), layers, request("grid:4", 2), mode=mode)
    by_index = {n: {t.output_centre: t for t in u.values()} for n, u in trfs.items()}
    units = {n: list(by_index[n]) for n in layers}
    groups = plan_groups(units, by_index, (40, 36), True, False)
    windows = {g.window for g in groups if g.window is not None}
    assert len(windows) >= 16
    plain = quiet_probe(net, x, layers, mode=mode, position="grid:4", crop=False)
    for crop in (True, "auto"):
        cropped = quiet_probe(net, x, layers, mode=mode, position="grid:4", crop=crop)
        for name in layers:
            fa, fb = plain[name].field, cropped[name].field
            assert fa is not None and fb is not None and list(fa) == list(fb)
            for key in fa:
                scale = float(fa[key].heatmap.abs().max())
                torch.testing.assert_close(
                    fb[key].heatmap, fa[key].heatmap, rtol=1e-5, atol=1e-6 * scale, msg=key
                )
                assert fb[key].centre_pixel == fa[key].centre_pixel


def wide_net() -> nn.Sequential:
    """Layer "2": small fields (5 px, stride 2); layer "4": a dilated conv whose field spans
    the whole input (probed on the full input)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=48, dilation=48),
    )


@pytest.fixture
def backward_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of seed values of every batched backward the probe runs from now on."""
    calls: list[int] = []
    real = _seeds.class_grads

    def counting(values: list[torch.Tensor], *args: object) -> list[torch.Tensor | None]:
        calls.append(len(values))
        return real(values, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_seeds, "class_grads", counting)
    return calls


def test_a_layer_rides_the_forward_of_a_deeper_layer_on_the_full_input(
    backward_sizes: list[int],
) -> None:
    """Issue 25.5: layer "2"'s 3 x 3 grid units, alone cheaper as nine small crops than on one
    window around them all, are probed from layer "4"'s full-input forward (which runs
    anyway): one packed backward there, no forward of their own."""
    net = wide_net()
    shape = (3, 160, 160)
    layers = ["2", "4"]
    trfs = theoretical_rfs(net, shape, layers, request("grid:3", 2))
    by_index = {n: {t.output_centre: t for t in u.values()} for n, u in trfs.items()}
    units = {n: list(by_index[n]) for n in layers}
    groups = plan_groups(units, by_index, shape[1:], "auto", False)
    (full,) = [g for g in groups if g.window is None]
    assert full.layers == layers and sorted(full.units["2"]) == sorted(units["2"])
    assert not any(g.layers == ["2"] for g in groups)
    # Without layer "4", layer "2" keeps its nine crops (one forward each).
    alone = plan_groups({"2": units["2"]}, by_index, shape[1:], "auto", False)
    assert len(alone) == 9 and all(g.window is not None for g in alone)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(7))
    calls = backward_sizes
    quiet_probe(net, x, ["4"], position="grid:3")
    deeper = sum(calls)
    calls.clear()
    res = quiet_probe(net, x, layers, position="grid:3")
    assert sum(calls) == deeper + 1  # layer "2": all nine units in one backward
    field = res["2"].field
    assert field is not None
    for key, r in field.items():
        ref = one_layer_reference(net, x, "2", r.output_index)
        torch.testing.assert_close(r.heatmap, ref, rtol=1e-5, atol=1e-7, msg=key)
        single = quiet_probe(net, x, ["2"], position=r.output_index)["2"]
        scale = float(single.heatmap.abs().max())
        torch.testing.assert_close(r.heatmap, single.heatmap, rtol=0, atol=1e-6 * scale)


def test_overlapping_units_share_forwards_on_the_windows_around_them() -> None:
    """Issue 25.5: units of a 3 x 3 grid whose fields overlap (each 229 px on a 224 px
    input) run neither each on its own crop nor all on the full input: neighbours share one
    forward on the window around them (one backward each), where the cost model says so."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 2, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=28, dilation=28),
        nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=28, dilation=28),
    )
    shape = (3, 224, 224)
    trfs = theoretical_rfs(net, shape, ["6"], request("grid:3", 2))
    by_index = {t.output_centre: t for t in trfs["6"].values()}
    groups = plan_groups({"6": list(by_index)}, {"6": by_index}, shape[1:], "auto", False)
    shared = [g for g in groups if g.window is not None and len(g.units["6"]) > 1]
    assert shared and len(groups) > 1
    assert sorted(i for g in groups for i in g.units["6"]) == sorted(by_index)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(8))
    res = quiet_probe(net, x, ["6"], position="grid:3")
    plain = quiet_probe(net, x, ["6"], position="grid:3", crop=False)
    field, whole = res["6"].field, plain["6"].field
    assert field is not None and whole is not None
    for key, r in field.items():
        scale = float(whole[key].heatmap.abs().max())
        torch.testing.assert_close(r.heatmap, whole[key].heatmap, rtol=0, atol=1e-6 * scale)
        ref = one_layer_reference(net, x, "6", r.output_index)
        torch.testing.assert_close(r.heatmap, ref, rtol=1e-5, atol=1e-7, msg=key)


def test_disjoint_units_share_a_backward(backward_sizes: list[int]) -> None:
    net = strided_net()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    calls = backward_sizes
    res = quiet_probe(net, x, ["4"], position="grid:5", crop=False)
    # Layer "4": 9 x 9 fields on a 24 x 24 grid of stride 2; grid units 0, 6, 12, 17, 23 sit
    # at input pixels 0, 12, 24, 34, 46: the fields are at least one pixel apart, so all 25
    # (the centre unit is the middle one) share one backward.
    assert calls == [1]
    field = res["4"].field
    assert field is not None
    for r in list(field.values())[::4]:
        torch.testing.assert_close(r.heatmap, one_layer_reference(net, x, "4", r.output_index),
                                   rtol=1e-5, atol=1e-7)  # fmt: skip


def test_a_wrong_trf_is_not_trusted_for_packing_either() -> None:
    net = strided_net()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    req = request("grid:3", 2)
    right = theoretical_rfs(net, (3, 32, 32), ["4"], req)["4"]
    # Each unit's field shrunk to its centre pixel: the units look disjoint, and are not.
    wrong = tuple(
        replace(t, clipped=tuple((int(c), int(c)) for c in t.centre)) for t in right.values()
    )
    plain = em.compute_erf(net, x, ["4"], position="grid:3", trf="skip", crop=False)["4"]
    for crop in (False, True):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            r = em.compute_erf(net, x, ["4"], position="grid:3", trf={"4": wrong}, crop=crop)["4"]
        mine = [str(w.message) for w in rec if "outside the clipped TRF" in str(w.message)]
        assert len(mine) == 1 and mine[0].startswith("Layer '4': ") and "grid3_y0_x0" in mine[0]
        assert not [w for w in rec if "cropping" in str(w.message)]
        assert r.field is not None and plain.field is not None
        for key in r.field:
            assert r.field[key].trf is None and r.field[key].trf_issue is not None
            torch.testing.assert_close(r.field[key].heatmap, plain.field[key].heatmap,
                                       rtol=1e-6, atol=0)  # fmt: skip


def test_batched_backwards_give_the_same_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vmapped path (``is_grads_batched``, used on accelerators) is exact too."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    plain = em.compute_erf(model, x, ["layer2", "layer3"], position="corners")
    monkeypatch.setattr(_seeds, "_BATCHED_DEVICES", frozenset({"cpu"}))
    batched = em.compute_erf(model, x, ["layer2", "layer3"], position="corners")
    for name in ("layer2", "layer3"):
        fa, fb = plain[name].field, batched[name].field
        assert fa is not None and fb is not None
        for key in fa:
            scale = float(fa[key].heatmap.max())
            torch.testing.assert_close(fb[key].heatmap, fa[key].heatmap, rtol=1e-4,
                                       atol=1e-6 * scale)  # fmt: skip


# ----------------------------------------------------------------------------- border metrics


def _square_radius(m: np.ndarray, c: tuple[int, int], t: float = 0.95) -> int:
    """Smallest radius whose centred square (clipped) holds more than t of the mass."""
    total = m.sum()
    for i in range(max(m.shape) + 1):
        part = m[max(c[0] - i, 0) : c[0] + i + 1, max(c[1] - i, 0) : c[1] + i + 1].sum()
        if part / total > t:
            return i
    raise AssertionError


def test_border_ratio_coverage_of_trf_and_offsets_at_the_corners() -> None:
    n, k, h, w = 4, 3, 21, 21
    net = ones_stack(n, k)
    x = torch.randn(1, 1, h, w)
    r = em.compute_erf(net, x, ["3"], position="corners")["3"]
    field = r.field
    assert field is not None and r.position == "centre" and r.output_index == (10, 10)

    def visible(iy: int, ix: int) -> float:
        m = np.outer(truncated_box(h, iy, n, k), truncated_box(w, ix, n, k))
        i = _square_radius(m, (iy, ix))
        side_y = min(iy + i, h - 1) - max(iy - i, 0) + 1
        side_x = min(ix + i, w - 1) - max(ix - i, 0) + 1
        return math.sqrt(side_y * side_x)

    corners = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)]
    expected = np.mean([visible(*c) for c in corners]) / visible(10, 10)
    assert field.border_ratio == pytest.approx(expected, rel=1e-12)
    assert field.border_ratio < 0.75  # the image keeps a quarter of a corner's square
    assert r.scalars()["border_ratio"] == pytest.approx(expected, rel=1e-12)
    top_left = field["corner_top_left"]
    # The truncated field's centroid lies inside the image: the offset points inwards.
    prof = truncated_box(h, 0, n, k)
    mean = float((np.arange(h) * prof).sum() / prof.sum())
    assert top_left.centroid_offset == pytest.approx((mean, mean), rel=1e-6)
    bottom_right = field["corner_bottom_right"]
    assert bottom_right.centroid_offset == pytest.approx((-mean, -mean), rel=1e-6)
    # Coverage of the clipped TRF (4 x 4 at a corner): the 95% square's part of it.
    m = np.outer(prof, truncated_box(w, 0, n, k))
    i = _square_radius(m, (0, 0))
    side = min(i, 4) + 1  # the clipped TRF is rows/cols 0..4
    assert top_left.coverage_trf == pytest.approx(side * side / 25)
    centre_map = np.outer(truncated_box(h, 10, n, k), truncated_box(w, 10, n, k))
    side = 2 * min(_square_radius(centre_map, (10, 10)), 4) + 1  # the TRF is rows 6..14
    assert r.coverage_trf == pytest.approx(side * side / 81)
    assert "border_ratio" not in em.compute_erf(net, x, ["3"], position="edges")["3"].scalars()


def test_single_position_result_and_keys() -> None:
    net = strided_net()
    x = torch.randn(1, 3, 16, 16)
    res = em.compute_erf(net, x, ["2"], position=(0, -1))
    r = res["2"]
    assert r.position == "y0_x-1" and r.output_index == (0, 7) and r.field is None
    assert list(res.scalars()) == ["2/y0_x-1"]
    assert "border_ratio" not in r.scalars()


# ----------------------------------------------------------------------------- integrations


def test_watch_logs_every_position_to_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    net = strided_net()
    writer = SummaryWriter(str(tmp_path))
    x = torch.randn(2, 3, 32, 32)
    metrics = ["coverage", "erf_size", "border_ratio", "dead_fraction", "coverage_trf"]
    w = em.watch(net, layers=["4"], every_n_steps=1, probe_inputs=x, min_coverage=None,
                 logger=writer, position="corners", metrics=metrics)  # fmt: skip
    w.step()
    w.step()
    w.close()
    writer.close()
    # The monitor's own run, in erf/ of the writer's directory.
    ea = EventAccumulator(str(tmp_path / "erf"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tags = {key_from_tag(t) for t in ea.Tags()["scalars"]}
    for key in ("corner_top_left", "corner_bottom_right"):
        assert f"erf/4/{key}/coverage" in tags and f"erf/4/{key}/erf_size" in tags
        assert f"erf/4/{key}/sigma_x" not in tags  # metrics= selects at every position
    assert {"erf/4/coverage", "erf/4/border_ratio", "erf/4/dead_fraction"} <= tags
    assert [e.step for e in ea.Scalars(tb_tag("erf/4/corner_top_left/coverage_trf"))] == [1, 2]
    assert (
        len(ea.Images(tb_tag("erf/4/field"))) == 2 and len(ea.Images(tb_tag("erf/4/heatmap"))) == 2
    )
    history = w.history
    assert "4/corner_top_left" in history and history["4"][1]["border_ratio"] > 0
    latest = w.latest
    assert latest is not None and latest["4"].field is not None


def test_wandb_keys_of_positions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    from wandb_records import wandb_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="erf-monitor-tests", dir=str(tmp_path), mode="offline")
    try:
        w = em.watch(strided_net(), layers=["4"], every_n_steps=1, min_coverage=None,
                     probe_inputs=torch.randn(2, 3, 24, 24), logger=run,
                     position=[(0, 0), (0.5, 1.0)])  # fmt: skip
        w.step()
        run_dir = Path(run.dir).parent
    finally:
        wandb.finish()
    rows = [h for h in wandb_history(run_dir) if "erf/4/y0_x0/coverage" in h]
    assert rows and "erf/4/y50pct_x100pct/erf_size" in rows[0] and "erf/4/coverage" in rows[0]
    images = sorted((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert any("field" in str(p) for p in images)


def test_lightning_monitor_with_a_grid(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = strided_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _i: int) -> torch.Tensor:
            return self.net(batch[0]).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 24, 24), torch.zeros(8))
    cb = em.ERFMonitor(layers=["net.4"], every_n_steps=2, num_samples=2, min_coverage=None,
                       position="grid:3")  # fmt: skip
    trainer = pl.Trainer(max_steps=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    assert set(cb.history) >= {"net.4", "net.4/grid3_y0_x0", "net.4/grid3_y2_x2"}
    assert all("border_ratio" in v for v in cb.history["net.4"].values())


def test_cli_analyze_writes_positions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from erf_monitor.cli import main

    out = tmp_path / "out"
    args = ["--input-size", "64", "--samples", "1", "--layers", "layer2", "--quiet"]
    code = main(
        ["analyze", "torchvision:resnet18", *args, "--position", "corners", "--out", str(out)]
    )
    assert code == 0
    printed = " ".join(capsys.readouterr().out.split())  # the table's legend, rewrapped
    for column in ("border_ratio", "aniso.", "dead", "visible", "of TRF", "offset y,x"):
        assert f"{column}:" in printed, column  # every terse column is explained on screen
    record = json.loads((out / "metrics.json").read_text())["layers"]["layer2"]
    assert record["position"] == "centre" and set(record["positions"]) == {
        "corner_top_left", "corner_top_right", "corner_bottom_left", "corner_bottom_right",
    }  # fmt: skip
    assert record["positions"]["corner_top_left"]["output_index"] == [0, 0]
    assert "border_ratio" in record["metrics"]
    assert (out / "fields" / "layer2.png").is_file()
    with np.load(out / "maps.npz", allow_pickle=False) as npz:
        assert "layer2/corner_top_left" in npz.files
    assert main(["analyze", "torchvision:resnet18", "--position", "0.5,2.0", "--quiet",
                 "--out", str(out)]) == 2  # fmt: skip
