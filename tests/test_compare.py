"""``erf-monitor compare``: several checkpoints on one probe set, maps, differences, intervals."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from erf_monitor.cli import main
from erf_monitor.cli.compare import CompareError, load_state, split_spec

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build():
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU(),
                             nn.Conv2d(8, 4, 3, padding=4, dilation=4))
    """
)


def _build() -> nn.Sequential:
    namespace: dict[str, object] = {}
    exec(FACTORY, namespace)  # the same factory as the file the CLI imports
    model = namespace["build"]()
    assert isinstance(model, nn.Sequential)
    return model


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    (tmp_path / "net.py").write_text(FACTORY)
    torch.manual_seed(0)  # what the CLI does before building each model (--seed 0)
    model = _build()
    # "trained": the dilated layers keep only their centre taps, so the ERF shrinks to the
    # first layer's 3x3 field; saved as a Lightning checkpoint (prefix "model.")
    with torch.no_grad():
        for i in (2, 4):
            w = model[i].weight
            centre = w[:, :, 1, 1].clone()
            w.zero_()
            w[:, :, 1, 1] = centre
    lightning = tmp_path / "narrow.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, lightning)
    return tmp_path / "net.py", lightning, tmp_path / "out"


def test_compare_checkpoints(setup: tuple[Path, Path, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    factory, ckpt, out = setup
    args = [f"{factory}:build", f"{factory}:build@{ckpt}", "--names", "init,narrow"]
    opts = ["--layers", "4", "--input-size", "33", "--channels", "1", "--samples", "12"]
    opts += ["--bootstrap", "60"]
    assert main(["compare", *args, *opts, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "init" in text and "narrow" in text and "±" in text
    record = json.loads((out / "compare.json").read_text())
    assert record["models"] == ["init", "narrow"] and record["num_samples"] == 12
    layer = record["layers"]["4"]
    init, narrow = layer["models"]["init"], layer["models"]["narrow"]
    assert narrow["erf_size"]["value"] == 3  # only the first 3x3 layer is left
    assert init["erf_size"]["value"] > 9
    assert narrow["erf_size"]["low"] == narrow["erf_size"]["high"] == 3  # no spread
    diff = layer["differences_vs_init"]["narrow"]["erf_size"]
    assert diff["value"] == narrow["erf_size"]["value"] - init["erf_size"]["value"]
    assert diff["high"] < 0  # the interval excludes 0: the ERF did shrink
    for ci in (init["sigma_x"], init["coverage"]):
        assert ci["low"] <= ci["value"] <= ci["high"]
    with np.load(out / "maps.npz", allow_pickle=False) as maps:
        assert sorted(maps.files) == ["init/4", "narrow/4"] and maps["init/4"].shape == (33, 33)
    from PIL import Image

    with Image.open(out / "compare.png") as img:  # 2 maps + 1 difference map
        assert img.size[0] > 2.5 * img.size[1]


def test_checkpoints_are_weights_only(tmp_path: Path) -> None:
    assert split_spec("a.py:f@b.ckpt") == ("a.py:f", "b.ckpt")
    model = _build()
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    load_state(_build(), plain)  # a plain state dict, no prefix
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "fn": print}, evil)  # needs unpickling code
    with pytest.raises(CompareError, match=r"refusing .* needs code to load \(print\)") as e:
        load_state(_build(), evil)
    assert len(str(e.value).splitlines()) == 1
    other = tmp_path / "other.pt"
    torch.save(nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(CompareError, match="does not match"):
        load_state(_build(), other)
    assert main(["compare", "torchvision:resnet18", "--samples", "1"]) == 2


def test_progress_is_shown_step_by_step_and_quiet_hides_it(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    factory, ckpt, out = setup
    args = ["compare", f"{factory}:build", f"{factory}:build@{ckpt}", "--names", "a,b"]
    opts = ["--layers", "2", "4", "--input-size", "25", "--channels", "1", "--samples", "6"]
    opts += ["--bootstrap", "20", "--out", str(out)]
    assert main([*args, *opts]) == 0
    err = capsys.readouterr().err  # not a terminal: one line per finished step
    steps = ["building a", "building b", "probing a", "probing b", "bootstrap 4"]
    steps += ["bootstrap 2: 2 model(s), 20 resamples", "writing compare.png"]
    for step in steps:
        assert f"{step}" in err and "done in" in err, step
    assert err.index("probing b") < err.index("bootstrap 2") < err.index("bootstrap 4")
    assert main([*args, *opts, "--quiet"]) == 0
    assert "done in" not in capsys.readouterr().err


def test_pretrained_path_and_images_work_as_in_analyze(
    tmp_path: Path, setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    _, ckpt, out = setup
    # the "trained" weights as a plain state dict: --pretrained=PATH gives them to every
    # MODEL without @CKPT, so both models below are the same network
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    plain = tmp_path / "narrow.pt"
    torch.save({k.removeprefix("model."): v for k, v in state.items()}, plain)
    rgb = tmp_path / "rgb.py"
    rgb.write_text(FACTORY.replace("nn.Conv2d(1, 8", "nn.Conv2d(3, 8"))
    images = tmp_path / "images"
    images.mkdir()
    gen = np.random.default_rng(0)
    for i in range(5):
        pixels = gen.integers(0, 255, (40, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    # the 3-channel twin of the checkpoint: the first layer's weights repeated per channel
    rgb_state = {k: (v.repeat(1, 3, 1, 1) / 3 if k == "0.weight" else v)
                 for k, v in torch.load(plain, weights_only=True).items()}  # fmt: skip
    torch.save(rgb_state, plain)
    torch.save({"state_dict": {f"model.{k}": v for k, v in rgb_state.items()}}, ckpt)
    args = ["compare", f"{rgb}:build", f"{rgb}:build@{ckpt}", "--names", "p,c"]
    opts = ["--layers", "4", "--images", str(images), "--size", "33", "--mean", "0.5"]
    opts += ["--std", "0.25", "--samples", "4", "--bootstrap", "20", "--out", str(out)]
    assert main([*args, *opts, f"--pretrained={plain}"]) == 0
    text = capsys.readouterr().out
    assert "Images preprocessed by" in text and "33x33" in text
    record = json.loads((out / "compare.json").read_text())
    assert record["num_samples"] == 4 and record["weights"] == str(plain)
    assert record["preprocessing"]["size"] == [33, 33]
    layer = record["layers"]["4"]
    assert layer["models"]["p"]["erf_size"]["value"] == 3  # --pretrained loaded the weights
    diff = layer["differences_vs_p"]["c"]
    assert diff["sigma_x"]["value"] == 0 and diff["sigma_x"]["low"] == diff["sigma_x"]["high"]
    with np.load(out / "maps.npz", allow_pickle=False) as maps:
        assert maps["p/4"].shape == (33, 33)
    # --pretrained alone reads the local cache only: a one-line message, no download
    assert main(["compare", "torchvision:resnet18", "--pretrained", "--samples", "2"]) == 2
    err = capsys.readouterr().err
    assert "--pretrained=PATH" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert main([*args, *opts[:2], "--input", "x.npy", "--images", str(images)]) == 2
    assert "not both" in capsys.readouterr().err


def test_a_checkpoint_with_another_head_says_which_num_classes_to_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torchvision

    ckpt = tmp_path / "resnet18@epoch=9.ckpt"  # Lightning's name: '@' inside the file name
    tuned = torchvision.models.resnet18(num_classes=10)
    torch.save({"state_dict": {f"model.{k}": v for k, v in tuned.state_dict().items()}}, ckpt)
    args = ["compare", "torchvision:resnet18", f"torchvision:resnet18@{ckpt}"]
    opts = ["--layers", "layer1", "--input-size", "48", "--samples", "3", "--bootstrap", "10"]
    opts += ["--out", str(tmp_path / "out"), "--quiet"]
    assert main([*args, *opts]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "size mismatch" not in err
    assert "fc.weight is 10x512 there but 1000x512 in the model" in err
    assert "pass --num-classes 10" in err
    assert main([*args, *opts, "--num-classes", "10"]) == 0
    record = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert record["models"] == ["torchvision:resnet18", f"torchvision:resnet18@{ckpt}"]
    assert main([*args, *opts, "--num-classes", "0"]) == 2
    assert "--num-classes must be >= 1" in capsys.readouterr().err


def test_help_advertises_only_options_that_exist(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--pretrained", "--images", "--size", "--num-classes", "--quiet"):
        assert option in text, option
    assert "--pretrained=PATH" in text and "(--pretrained alone)" in text  # the epilog's words


def test_names_and_paths_are_printed_as_given_never_as_markup(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--names 'net[/]'`` (rich would read a closing tag) and ``--out 'exp[lr=0.1]'`` (a
    tag that would vanish) are printed as typed, and the run succeeds."""
    factory, ckpt, out = setup
    out = out.parent / "exp[lr=0.1]"
    args = ["compare", f"{factory}:build", f"{factory}:build@{ckpt}", "--names", "net[/],b[bold]"]
    opts = ["--layers", "4", "--input-size", "17", "--channels", "1", "--samples", "4"]
    assert main([*args, *opts, "--bootstrap", "10", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "net[/]" in text and "b[bold]" in text
    assert f"{out / 'compare.json'}" in text.replace("\n", "")
    assert (out / "compare.json").is_file()
    analyzed = out.parent / "an[lr=0.1]"
    opts = ["--input-size", "17", "--channels", "1", "--samples", "2", "--layers", "4"]
    assert main(["analyze", f"{factory}:build", *opts, "--out", str(analyzed), "--quiet"]) == 0
    assert f"{analyzed / 'metrics.json'}" in capsys.readouterr().out.replace("\n", "")
