"""One-line messages that say what to do, and no traceback printed when a fallback works."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import nn

import erf_monitor as em
from erf_monitor.cli import main


class DictInput(nn.Module):
    """A model whose forward takes a dict, as many training pipelines' models do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.out(torch.relu(self.conv(batch["image"])))


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.reentrant = reentrant  # None: no checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant is None:
            return self.b(self.a(x))
        return self.b(cp.checkpoint(self.a, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("layers", ["auto", "out"])
def test_forward_that_wants_a_dict_suggests_forward_fn(layers: str) -> None:
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(em.ERFProbeError, match=r"before any of its layers ran.*forward_fn") as e:
        em.compute_erf(DictInput(), x, layers)
    assert "\n" not in str(e.value) and "IndexError" in str(e.value)
    assert isinstance(e.value, ValueError)  # also what theoretical_rf documents
    res = em.compute_erf(DictInput(), x, layers, forward_fn=lambda m, t: m({"image": t}))
    assert list(res)[-1] == "out"
    assert res["out"].trf is not None and res["out"].trf.size == (5.0, 5.0)


def test_forward_failure_traceback_only_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="erf_monitor"), pytest.raises(em.ERFProbeError):
        em.compute_erf(DictInput(), torch.randn(1, 3, 8, 8), "out", trf="skip")
    assert any(r.exc_info and r.exc_info[0] is IndexError for r in caplog.records)


def test_reentrant_checkpoint_says_use_reentrant_false() -> None:
    x = torch.randn(2, 3, 8, 8)
    for layers in ("b", "auto"):
        with pytest.raises(em.ERFProbeError, match=r"use_reentrant=False"):
            em.compute_erf(Checkpointed(reentrant=True), x, layers)
    net = Checkpointed(reentrant=False)
    res = em.compute_erf(net, x, "b")
    net.reentrant = None
    plain = em.compute_erf(net, x, "b")
    assert res["b"].trf is not None and res["b"].trf.size == (5.0, 5.0)
    torch.testing.assert_close(res["b"].heatmap, plain["b"].heatmap)


def test_meta_model_and_inputs_refused_in_one_line() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    x = torch.randn(1, 3, 8, 8)
    for call in (
        lambda: em.compute_erf(net, x, "0"),
        lambda: em.theoretical_rf(net, (3, 8, 8), ["0"]),
    ):
        with pytest.raises(ValueError, match=r"'meta' device.*to_empty") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="inputs are on the 'meta' device"):
        em.compute_erf(nn.Conv2d(3, 4, 3), x.to("meta"), "auto")


def test_int_inputs_say_how_to_convert() -> None:
    x = torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"torch\.uint8: convert images first.*load_images"):
        em.compute_erf(nn.Sequential(nn.Conv2d(3, 4, 3)), x, "0")


def test_failed_fx_trace_prints_nothing_when_the_fallback_works(
    capfd: pytest.CaptureFixture[str],
) -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x if bool(x.mean() > -1e9) else -x  # fx cannot trace this branch
            return self.a(x)

    class BadShape(nn.Module):  # indexing with a tensor: no fx rule
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x[:, :, torch.arange(x.shape[2])])

    for net in (DataDependent(), BadShape()):
        # The field (3 x 3 inside the 8 x 8 input) is measured exactly: no warning.
        with warnings.catch_warnings():
            warnings.simplefilter("error", em.ERFProbeWarning)
            trf = em.theoretical_rf(net, (3, 8, 8), ["a"])
        assert trf["a"].size == (3.0, 3.0) and trf["a"].method == "numeric"
        # At the border the numeric method cannot see on: the fallback warns.
        with pytest.warns(em.ERFProbeWarning, match="falling back to the numeric method.*border"):
            trf = em.theoretical_rf(net, (3, 8, 8), ["a"], position=(0, 0))
        assert trf["a"].clipped == ((0, 1), (0, 1))

    # A branch fx cannot trace *after* the analysed layer is never reached: the trace stops
    # once the layer has returned, so the field is traced.
    class LateBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return y if bool(y.mean() > -1e9) else -y

    assert em.theoretical_rf(LateBranch(), (3, 8, 8), ["a"])["a"].method == "fx"
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_an_exact_numeric_fallback_is_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    class Summed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(torch.cumsum(x, dim=1))  # over channels: no fx rule, field 3 x 3

    with caplog.at_level("INFO", logger="erf_monitor"), warnings.catch_warnings():
        warnings.simplefilter("error", em.ERFProbeWarning)
        trf = em.theoretical_rf(Summed(), (3, 9, 9), ["a"])["a"]
    assert trf.method == "numeric" and trf.clipped == ((3, 5), (3, 5))
    assert "measured with the numeric method (no receptive-field rule for" in caplog.text


def test_cli_forward_failure_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_file = tmp_path / "dict_model.py"
    model_file.write_text(
        "import torch\n"
        "from torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 4, 3)\n"
        "    def forward(self, batch):\n"
        "        return self.conv(batch['image'])\n"
        "def make():\n"
        "    return M()\n"
    )
    code = main(
        ["analyze", f"{model_file}:make", "--input-size", "16", "--samples", "1", "--quiet",
         "--out", str(tmp_path / "out")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "forward_fn" in err and "Traceback" not in err


class _FrozenStem(nn.Module):
    def __init__(self, detach: bool) -> None:
        super().__init__()
        self.detach = detach
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.detach:
            return self.head(self.stem(x).detach())
        with torch.no_grad():
            y = self.stem(x)
        return self.head(y)


@pytest.mark.parametrize("detach", [False, True])
def test_a_graph_cut_in_the_forward_is_named(detach: bool) -> None:
    """A frozen stem run under no_grad (or detached) gives a zero map: say why, not "dead
    ReLUs"; dead ReLUs keep their own message."""
    with pytest.warns(em.ERFProbeWarning, match=r"no_grad\(\) or \.detach\(\)") as rec:
        r = em.compute_erf(_FrozenStem(detach).eval(), torch.randn(2, 1, 8, 8), ["head"])
    assert float(r["head"].heatmap.sum()) == 0.0
    assert not any("dead ReLUs" in str(w.message) for w in rec)
    dead = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    nn.init.constant_(dead[0].bias, -100.0)
    with pytest.warns(em.ERFProbeWarning, match="dead ReLUs"):
        em.compute_erf(dead.eval(), torch.rand(2, 1, 8, 8), ["1"])


def test_a_probe_dtype_the_model_does_not_take_says_what_dtype_does() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3)).eval()
    with pytest.raises(em.ERFProbeError, match=r"casts the inputs only.*model\.double\(\)"):
        em.compute_erf(net, torch.randn(2, 1, 8, 8), ["0"], dtype=torch.float64)


def test_a_non_finite_probe_batch_is_described_as_it_is() -> None:
    """The monitor's message names the real batch (its shape, the samples with NaN), not the
    2-sample example its plan is built on."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))
    x = torch.randn(6, 1, 12, 12)
    x[0, 0, 3, 3] = float("nan")
    x[3, 0, 5, 5] = float("inf")
    w = em.watch(net, ["2"], probe_inputs=x, every_n_steps=1, summary=False, min_coverage=None)
    with pytest.warns(em.ERFProbeWarning) as rec:
        w.step()
    w.remove()
    (msg,) = [str(r.message) for r in rec if issubclass(r.category, em.ERFProbeWarning)]
    assert "shape (6, 1, 12, 12)" in msg and "sample(s) 0, 3)" in msg, msg
