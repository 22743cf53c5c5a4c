"""Output selectors (``"backbone['0']"``, ``"stage[0]"``, ModelOutput fields) and wrappers.

Each selected ERF is checked against a plain reference: the gradient of the selected tensor's
centre unit, computed by hand with ``torch.autograd.grad`` on the same model.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import erf_monitor as em
from erf_monitor.targets.layers import (
    format_selector,
    locate_layer,
    parse_layer_spec,
    resolve_layers,
)
from erf_monitor.targets.outputs import describe_output, select_output


def reference_map(full: nn.Module, x: torch.Tensor, pick: object) -> torch.Tensor:
    """Luo map of a tensor picked by ``pick(model, x) -> (N, C, H, W)``, plainly computed."""
    maps = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        y = pick(full, xi)  # type: ignore[operator]
        c = tuple(s // 2 for s in y.shape[2:])
        (g,) = torch.autograd.grad(y[(0, slice(None), *c)].sum(), xi)
        maps.append(g.abs().sum(1)[0])
    return torch.stack(maps).mean(0)


class TwoLevels(nn.Module):
    """Returns a dict of two maps, like a detection backbone returns FPN levels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        y = torch.relu(self.a(x))
        return OrderedDict([("0", y), ("1", self.b(y))])


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, padding=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        y = self.conv(x)
        return y, {"feat": torch.tanh(y[:, :2]), "mask": (y > 0).long()}


@dataclasses.dataclass
class Out:
    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


class DataclassOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> Out:
        return Out(self.conv(x))


class Holder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.backbone = inner
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(x)
        first = out["0"] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else out
        return self.head(first.hidden if isinstance(first, Out) else first)


# ----------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    ("spec", "path", "selector"),
    [
        ("backbone", "backbone", ()),
        ("backbone['0']", "backbone", ("0",)),
        ('backbone["0"]', "backbone", ("0",)),
        ("backbone[0]", "backbone", (0,)),
        ("stage[-1]", "stage", (-1,)),
        ("layer[0]['feat']", "layer", (0, "feat")),
        ("vit.encoder[last_hidden_state]", "vit.encoder", ("last_hidden_state",)),
        ("head[1].logits", "head", (1, "logits")),
        ("a['x.y[z]']", "a", ("x.y[z]",)),
    ],
)
def test_parse_layer_spec(spec: str, path: str, selector: tuple[object, ...]) -> None:
    assert parse_layer_spec(spec) == (path, selector)


@pytest.mark.parametrize("spec", ["a[0", "a['0]", "a[]", "a[0]x", "a[0]."])
def test_malformed_selectors_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_layer_spec(spec)


def test_format_selector_round_trips() -> None:
    for sel in [(0,), ("0",), (1, "feat"), ("it's",)]:
        assert parse_layer_spec("m" + format_selector(sel)) == ("m", sel)


def test_dotted_names_are_modules_only_fields_need_brackets() -> None:
    net = Holder(DataclassOut())
    assert locate_layer(net, "backbone[hidden]")[0::2] == ("backbone", ("hidden",))
    assert locate_layer(net, "backbone.conv")[0::2] == ("backbone.conv", ())
    # A dotted name that is no module is a typo, refused at once with close matches, never
    # read as a field that would only fail (as a warning) at the first probe.
    with pytest.raises(ValueError, match=r"Unknown layer 'backbone\.hiden'.*backbone"):
        locate_layer(net, "backbone.hiden")
    with pytest.raises(ValueError, match=r"Unknown layer 'backbone\.hidden'"):
        locate_layer(net, "backbone.hidden")


def test_glob_with_selector_and_legacy_char_class() -> None:
    net = nn.Sequential(TwoLevels(), TwoLevels())
    assert resolve_layers(net, "*['1']") == ["0['1']", "1['1']"]
    tv = pytest.importorskip("torchvision")
    # "layer[12]" is still the glob character class (there is no module "layer").
    assert resolve_layers(tv.models.resnet18(), "layer[12]") == ["layer1", "layer2"]


# ----------------------------------------------------------------------------- selection


def test_dict_key_and_int_fallback_select_the_same_level() -> None:
    torch.manual_seed(0)
    net = Holder(TwoLevels())
    x = torch.randn(2, 3, 16, 16)
    res = em.compute_erf(net, x, ["backbone['1']", "backbone[1]", "backbone['0']"])
    ref1 = reference_map(net, x, lambda m, xi: m.backbone(xi)["1"])
    ref0 = reference_map(net, x, lambda m, xi: m.backbone(xi)["0"])
    torch.testing.assert_close(res["backbone['1']"].heatmap, ref1, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(res["backbone[1]"].heatmap, ref1, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(res["backbone['0']"].heatmap, ref0, rtol=1e-5, atol=1e-8)
    # The fx analysis starts from the selected level: 3x3 then a strided 3x3.
    assert res["backbone['1']"].trf is not None and res["backbone['1']"].trf.method == "fx"
    assert res["backbone['1']"].trf.size == (5.0, 5.0)  # 3 + (3 - 1) * 1
    assert res["backbone['0']"].trf.size == (3.0, 3.0)


def test_chained_selector_and_theoretical_rf() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(Pair())
    x = torch.randn(2, 3, 12, 12)
    res = em.compute_erf(net, x, ["0[1]['feat']", "0[0]"])
    ref = reference_map(net, x, lambda m, xi: m[0](xi)[1]["feat"])
    torch.testing.assert_close(res["0[1]['feat']"].heatmap, ref, rtol=1e-5, atol=1e-8)
    for method in ("fx", "numeric"):
        trf = em.theoretical_rf(net, (3, 12, 12), ["0[1]['feat']"], method=method)
        assert trf["0[1]['feat']"].size == (5.0, 5.0), method


def test_dataclass_field_by_name() -> None:
    torch.manual_seed(0)
    net = Holder(DataclassOut())
    x = torch.randn(1, 3, 9, 9)
    res = em.compute_erf(net, x, "backbone[hidden]", trf="skip")
    ref = reference_map(net, x, lambda m, xi: m.backbone(xi).hidden)
    torch.testing.assert_close(res["backbone[hidden]"].heatmap, ref, rtol=1e-5, atol=1e-8)


def test_messages_list_the_output_and_suggest_a_selector() -> None:
    net = Holder(TwoLevels())
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"returned an OrderedDict \{'0': tensor \(1, 4, 8, 8\)"):
        em.compute_erf(net, x, "backbone", trf="skip")
    with pytest.raises(ValueError, match=r"e\.g\. \"backbone\['0'\]\""):
        em.compute_erf(net, x, "backbone", trf="skip")
    with pytest.raises(ValueError, match=r"selector \['2'\] matches nothing: its output is an"):
        em.compute_erf(net, x, "backbone['2']", trf="skip")
    with pytest.raises(ValueError, match=r"returned an OrderedDict.*select one"):
        em.theoretical_rf(net, (3, 8, 8), ["backbone"], method="numeric")
    pair = nn.Sequential(Pair())
    with pytest.raises(ValueError, match=r"\['mask'\].*torch\.int64 tensor, which has no gradient"):
        em.compute_erf(pair, x, "0[1]['mask']", trf="skip")


def test_describe_nested_outputs() -> None:
    out = (torch.zeros(1, 3136, 96), (torch.zeros(1, 96, 56, 56), None), None)
    assert describe_output(out) == (
        "a tuple of 3 (tensor (1, 3136, 96), tuple of 2 (tensor (1, 96, 56, 56), None), None)"
    )
    with pytest.raises(ValueError, match=r"part \[1\] is a tuple of 2"):
        select_output(out, (1, 5), "x")


# ----------------------------------------------------------------------------- real models


def test_faster_rcnn_fpn_levels() -> None:
    tvd = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    net = tvd.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, min_size=64, max_size=64
    ).eval()
    x = torch.rand(2, 3, 64, 64)
    res = em.compute_erf(net, x, ["backbone['0']", "backbone['pool']"], trf="skip")

    def level(key: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
        def pick(m: nn.Module, xi: torch.Tensor) -> torch.Tensor:
            images, _ = m.transform(list(xi))
            return m.backbone(images.tensors)[key]

        return pick

    torch.testing.assert_close(
        res["backbone['0']"].heatmap, reference_map(net, x, level("0")), rtol=1e-4, atol=1e-9
    )
    assert res["backbone['pool']"].output_shape == (1, 1)


def test_hugging_face_swin_stage_tuple() -> None:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.SwinConfig(
        image_size=32, patch_size=4, embed_dim=12, depths=[1, 1], num_heads=[1, 2], window_size=4
    )
    net = tf.SwinForImageClassification(cfg).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"returned a tuple of 3 \(tensor \(1, 16, 24\).*e\.g\. "):
        em.compute_erf(net, x, "swin.encoder.layers.0", trf="skip")
    res = em.compute_erf(net, x, ["swin.encoder.layers.0[0]", "swin.encoder.layers.0[1]"])
    a, b = res["swin.encoder.layers.0[0]"], res["swin.encoder.layers.0[1]"]
    # [0] is the token sequence after patch merging, [1] the same map as (N, C, H, W).
    assert a.output_shape == b.output_shape == (4, 4)
    torch.testing.assert_close(a.heatmap, b.heatmap)
    # One unshifted block: a token sees its 4x4-token window (16 px); merged unit (2, 2) is
    # made of tokens 4..5, inside the window of tokens 4..7 = pixels 16..31.
    assert a.trf is not None and a.trf.clipped == ((16, 31), (16, 31))
    out = em.compute_erf(net, x, "swin.encoder[last_hidden_state]", trf="skip")
    assert out["swin.encoder[last_hidden_state]"].output_shape == (4, 4)  # no merge at the end


# ----------------------------------------------------------------------------- wrappers


def test_data_parallel_names_with_or_without_module_prefix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    dp = nn.DataParallel(inner)  # no GPU: DataParallel calls the module itself
    x = torch.randn(2, 3, 10, 10)
    with caplog.at_level(logging.INFO, logger="erf_monitor"):
        res = em.compute_erf(dp, x, ["module.2", "0"])
    assert "layer 'module.2' is module '2' inside DataParallel" in caplog.text
    plain = em.compute_erf(inner, x, ["2", "0"])
    torch.testing.assert_close(res["module.2"].heatmap, plain["2"].heatmap)
    assert res["module.2"].trf == plain["2"].trf
    trf = em.theoretical_rf(dp, (3, 10, 10), ["module.2", "2"])
    assert trf["module.2"].size == trf["2"].size == (5.0, 5.0)
    with pytest.raises(ValueError, match=r"'module\.' prefix of DataParallel/DDP"):
        em.compute_erf(nn.DataParallel(nn.Sequential(Holder(TwoLevels()))), x, "module.9")
    # A model built with a child called "module" (a hand-made wrapper) resolves the same way.
    wrapped = nn.Module()
    wrapped.module = inner
    wrapped.forward = lambda t: wrapped.module(t)  # type: ignore[method-assign]
    assert resolve_layers(wrapped, ["2", "module.2"]) == ["2", "module.2"]


def test_watch_with_selector_and_data_parallel() -> None:
    torch.manual_seed(0)
    net = nn.DataParallel(Holder(TwoLevels()))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with em.watch(
        net, ["backbone['1']", "module.head"], every_n_steps=1, optimizer=opt, min_coverage=None
    ) as w:
        for _ in range(2):
            loss = net(torch.randn(2, 3, 12, 12)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert w.latest is not None
    assert list(w.latest) == ["backbone['1']", "module.head"]
    assert w.latest["backbone['1']"].trf is not None


class Parallel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = TwoLevels()
        self.b = TwoLevels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)["1"] + self.b(x)["1"]


def test_selector_globs_in_token_layout_and_min_coverage_keys() -> None:
    from erf_monitor.monitor.engine import MonitorEngine

    torch.manual_seed(0)
    net = Parallel()
    eng = MonitorEngine(
        layers=["a['0']", "a['1']", "b['1']"], num_samples=2, min_coverage={"*['1']": 0.99}
    )
    eng.check_layers(net)
    eng.set_probe_batch(torch.randn(2, 3, 16, 16))
    with pytest.warns(em.ERFCoverageWarning):
        outcome = eng.probe(net, 0)
    assert outcome.results is not None and list(outcome.results) == ["a['0']", "a['1']", "b['1']"]
    assert sorted(eng._thresholds) == ["a['1']", "b['1']"]
    with pytest.raises(ValueError, match="matches no module"):
        MonitorEngine(layers=["a['0']"], min_coverage={"c['1']": 0.5}).check_layers(net)
    # token_layout keys: a glob with a selector matches the selected names.
    layout = {"*['1']": em.TokenLayout(channels_last=True, grid=(9, 9))}
    with pytest.raises(ValueError, match=r"TokenLayout\.grid"):
        em.compute_erf(net, torch.randn(1, 3, 8, 8), ["a['1']"], token_layout=layout)


def test_lightning_monitor_on_hugging_face_swin_with_selectors(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning.pytorch")
    tf = pytest.importorskip("transformers")
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    cfg = tf.SwinConfig(
        image_size=32, patch_size=4, embed_dim=12, depths=[1, 1], num_heads=[1, 2],
        window_size=4, num_labels=3,
    )  # fmt: skip

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tf.SwinForImageClassification(cfg)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x).logits

        def training_step(self, batch: list[torch.Tensor], _i: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self) -> DataLoader:
            ds = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
            return DataLoader(ds, batch_size=4)

    layers = ["model.swin.encoder.layers.0[0]", "model.swin.encoder[last_hidden_state]"]
    cb = em.ERFMonitor(layers=layers, every_n_steps=2, num_samples=2, min_coverage=None)
    auto = em.ERFMonitor(layers="auto", every_n_steps=2, num_samples=2, min_coverage=None)
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        callbacks=[cb, auto],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.ERFProbeWarning)  # fx cannot trace transformers
        trainer.fit(Module())
    assert sorted(cb.history) == sorted(layers)
    assert sorted(cb.history[layers[0]]) == [0, 2]
    assert "erf_size" in cb.history[layers[0]][2] and "sigma_x" in cb.history[layers[0]][2]
    # The last stage does not merge patches: stage 0's blocks (8x8), then the encoder (4x4).
    assert auto.layers == [
        "model.swin.encoder.layers.0.blocks.0[0]",
        "model.swin.encoder['last_hidden_state']",
    ]


def test_cli_layers_with_selectors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from erf_monitor.cli import main

    model_file = tmp_path / "levels.py"
    model_file.write_text(
        "from collections import OrderedDict\n"
        "import torch\n"
        "from torch import nn\n"
        "class Levels(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a = nn.Conv2d(3, 4, 3, padding=1)\n"
        "        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)\n"
        "    def forward(self, x):\n"
        "        y = self.a(x)\n"
        "        return OrderedDict([('0', y), ('1', self.b(y))])\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.backbone = Levels()\n"
        "    def forward(self, x):\n"
        "        return self.backbone(x)['1'].mean((2, 3))\n"
        "def make():\n"
        "    return Net()\n"
    )
    out = tmp_path / "out"
    code = main(
        ["analyze", f"{model_file}:make", "--layers", "backbone['0'],backbone[1]", "--quiet",
         "--input-size", "16", "--samples", "2", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rec = json.loads((out / "metrics.json").read_text())
    assert list(rec["layers"]) == ["backbone['0']", "backbone[1]"]
    assert rec["layers"]["backbone[1]"]["trf"]["size"] == [5.0, 5.0]
    heatmaps = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert heatmaps == ["backbone%5B%270%27%5D.png", "backbone%5B1%5D.png"]
    code = main(["analyze", f"{model_file}:make", "--layers", "backbone", "--quiet",
                 "--input-size", "16", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "select one, e.g. \"backbone['0']\"" in err


def test_ddp_wrapper_is_probed_through_its_module(tmp_path: Path) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        inner = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3))
        ddp = nn.parallel.DistributedDataParallel(inner)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        x = torch.randn(2, 3, 10, 10)
        for _step in range(2):
            res = em.compute_erf(ddp, x, ["module.2", "0"])  # between training steps
            loss = ddp(x).square().mean()
            opt.zero_grad()
            loss.backward()  # DDP's reducer is untouched by the probe: no reduction error
            opt.step()
            assert res["module.2"].trf is not None and res["module.2"].trf.size == (5.0, 5.0)
        plain = em.compute_erf(inner, x, ["2"])
        torch.testing.assert_close(em.compute_erf(ddp, x, ["2"])["2"].heatmap, plain["2"].heatmap)
    finally:
        dist.destroy_process_group()


def test_fx_walk_starts_at_the_getitem_of_a_leaf_module_output() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)  # fx: one leaf op

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.embed(x).flatten(2).transpose(1, 2)
            out, _ = self.attn(t, t, t)
            return out

    net = Tokens()
    trf = em.theoretical_rf(net, (3, 16, 16), ["attn[0]"], method="fx")["attn[0]"]
    assert trf.method == "fx" and trf.is_global  # attention: every token sees every token
    res = em.compute_erf(net, torch.randn(1, 3, 16, 16), ["attn[0]"])
    assert res["attn[0]"].output_shape == (4, 4) and res["attn[0]"].trf == trf
