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
    with pytest.raises(CompareError, match="cannot load"):
        load_state(_build(), evil)
    other = tmp_path / "other.pt"
    torch.save(nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(CompareError, match="does not match"):
        load_state(_build(), other)
    assert main(["compare", "torchvision:resnet18", "--samples", "1"]) == 2
