"""Real images and real weights: ``load_images`` and ``analyze --images/--pretrained``.

Images are written by the tests with Pillow; weights are checkpoints saved by the tests, put
where torchvision/timm keep downloaded weights (nothing is downloaded, ever).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import erf_monitor as em
from erf_monitor.cli import main
from erf_monitor.inputs.images import Preprocessing, preprocessing_for


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    d = tmp_path / "images"
    (d / "nested").mkdir(parents=True)
    Image.fromarray((rng.random((70, 50, 3)) * 255).astype("uint8")).save(d / "a.png")
    Image.fromarray((rng.random((40, 60)) * 255).astype("uint8"), "L").save(d / "b.jpg")
    Image.fromarray((rng.random((64, 64, 4)) * 255).astype("uint8"), "RGBA").save(
        d / "nested" / "c.png"
    )
    (d / "notes.txt").write_text("not an image")
    return d


def stripes(width: int = 40, height: int = 20) -> Image.Image:
    """Red for x < 10, green for 10 <= x < 30, blue for x >= 30."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, :10, 0] = 255
    arr[:, 10:30, 1] = 255
    arr[:, 30:, 2] = 255
    return Image.fromarray(arr)


def test_folder_is_read_recursively_sorted_and_as_rgb(image_dir: Path) -> None:
    x = em.load_images(image_dir, size=16, mean=(0, 0, 0), std=(1, 1, 1))
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    gray = x[1]  # b.jpg, grayscale: three equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert em.load_images(image_dir, size=8, max_images=2).shape[0] == 2


def test_builtin_pipeline_resizes_crops_and_normalises_exactly(tmp_path: Path) -> None:
    stripes().save(tmp_path / "s.png")
    prep = Preprocessing(
        size=(20, 20), mean=(0.5, 0.25, 0.0), std=(0.5, 0.5, 2.0), crop_pct=1.0,
        interpolation="nearest",
    )  # fmt: skip
    x = em.load_images(tmp_path, transform=prep)[0]
    # The shorter side (20) already has the size: the centre 20 columns (10..29) are green.
    expected = (torch.tensor([0.0, 1.0, 0.0]) - torch.tensor(prep.mean)) / torch.tensor(prep.std)
    assert torch.equal(x, expected.view(3, 1, 1).expand(3, 20, 20))
    # crop_pct 0.5: the shorter side goes to 40 (the image doubles to 80x40), crop 20x20 of
    # the middle: columns 30..49 of the doubled image, green (20..59 is green).
    half = Preprocessing(size=(20, 20), mean=(0, 0, 0), std=(1, 1, 1), crop_pct=0.5,
                         interpolation="nearest")  # fmt: skip
    y = em.load_images(tmp_path, transform=half)[0]
    assert torch.equal(y, torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 20, 20))


def test_timm_data_config_is_used(image_dir: Path) -> None:
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_model_data_config

    model = timm.create_model("resnet18", pretrained=False)
    x = em.load_images(image_dir, model=model)
    cfg = resolve_model_data_config(model)
    tf = create_transform(**cfg, is_training=False)
    paths = sorted(p for p in image_dir.rglob("*") if p.suffix in (".png", ".jpg"))
    ref = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    assert torch.equal(x, ref)
    assert preprocessing_for(model).source == "timm data config"
    # Explicit numbers override the config's, the rest is kept.
    p = preprocessing_for(model, size=32)
    assert p.size == (32, 32) and p.mean == tuple(cfg["mean"]) and p.source == "explicit"


def test_torchvision_weights_transforms(image_dir: Path) -> None:
    tvm = pytest.importorskip("torchvision.models")
    weights = tvm.ResNet18_Weights.DEFAULT
    x = em.load_images(image_dir, transform=weights.transforms())
    paths = sorted(p for p in image_dir.rglob("*") if p.suffix in (".png", ".jpg"))
    ref = torch.stack([weights.transforms()(Image.open(p).convert("RGB")) for p in paths])
    assert torch.equal(x, ref)
    p = preprocessing_for(transform=weights.transforms())
    assert p.size == (224, 224) and p.crop_pct == pytest.approx(224 / 256)


def test_bad_folders_and_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        em.load_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No images"):
        em.load_images(tmp_path / "empty")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"Cannot read image .*bad\.png"):
        em.load_images([tmp_path / "bad.png"])


def test_probe_on_loaded_images(image_dir: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, padding=2), torch.nn.ReLU())
    x = em.load_images(image_dir, size=24)
    r = em.compute_erf(net, x, ["1"])["1"]
    assert r.num_samples == 3 and r.heatmap.shape == (24, 24) and r.trf is not None


# ----------------------------------------------------------------------------- CLI


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["analyze", *args, "--quiet"])
    return code, capsys.readouterr().err.strip()


def test_cli_images_with_torchvision_preprocessing(
    image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torchvision")
    out = tmp_path / "out"
    code, err = run(
        ["torchvision:resnet18", "--images", str(image_dir), "--samples", "2", "--layers",
         "layer1", "--out", str(out)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["input_shape"] == [2, 3, 224, 224]
    assert rec["preprocessing"]["source"] == "torchvision weights ResNet18_Weights.IMAGENET1K_V1"
    assert rec["weights"] == "random init"
    code, _ = run(
        ["torchvision:resnet18", "--images", str(image_dir), "--size", "32", "--mean", "0.5",
         "--std", "0.5", "--layers", "layer1", "--out", str(out)],
        capsys,
    )  # fmt: skip
    rec = json.loads((out / "metrics.json").read_text())
    assert code == 0 and rec["input_shape"] == [3, 3, 32, 32]
    assert rec["preprocessing"]["source"] == "explicit" and rec["preprocessing"]["mean"] == [0.5]
    code, err = run(["torchvision:resnet18", "--size", "32"], capsys)
    assert code == 2 and "--images" in err


def probe_maps(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "maps.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def expected_maps(model: torch.nn.Module, layer: str) -> np.ndarray:
    """The CLI's noise input (seed 0, 2 samples, 32 px) probed in-process."""
    x = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    return em.compute_erf(model.eval(), x, [layer])[layer].heatmap.numpy()


NOISE = ["--input-size", "32", "--samples", "2", "--layers", "layer1"]


def test_cli_pretrained_checkpoint_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(123)
    trained = tvm.resnet18()
    ckpt = tmp_path / "run.ckpt"  # Lightning-style: prefixed keys under "state_dict"
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}, ckpt)
    out = tmp_path / "out"
    code, err = run(["torchvision:resnet18", f"--pretrained={ckpt}", *NOISE, "--out", str(out)],
                    capsys)  # fmt: skip
    assert code == 0, err
    np.testing.assert_allclose(probe_maps(out)["layer1"], expected_maps(trained, "layer1"),
                               rtol=1e-5, atol=1e-9)  # fmt: skip
    assert json.loads((out / "metrics.json").read_text())["weights"] == str(ckpt)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    code, err = run(["torchvision:resnet18", f"--pretrained={tmp_path / 'other.pth'}", *NOISE],
                    capsys)  # fmt: skip
    assert code == 2 and "do not fit the model" in err and len(err.splitlines()) == 1


def test_cli_pretrained_from_torch_hub_cache_or_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tvm = pytest.importorskip("torchvision.models")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code, err = run(["torchvision:resnet18", "--pretrained", *NOISE], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "no local copy of ResNet18_Weights.IMAGENET1K_V1" in err and "never downloads" in err
    # What torchvision leaves in the cache after a download elsewhere:
    torch.manual_seed(7)
    cached = tvm.resnet18()
    target = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True)
    torch.save(cached.state_dict(), target)
    out = tmp_path / "out"
    # "--pretrained MODEL" (the flag first) works too.
    code, err = run(["--pretrained", "torchvision:resnet18", *NOISE, "--out", str(out)], capsys)
    assert code == 0, err
    np.testing.assert_allclose(probe_maps(out)["layer1"], expected_maps(cached, "layer1"),
                               rtol=1e-5, atol=1e-9)  # fmt: skip


class _Payload:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_cli_pretrained_cache_pickle_runs_no_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pickle planted in the torch.hub cache (torchvision's file name for the weights) and
    one planted in the Hugging Face cache (timm's): refused in one line, no code run."""
    pytest.importorskip("torchvision.models")
    timm = pytest.importorskip("timm")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    marker = tmp_path / "pwned"
    target = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True)
    torch.save({"conv1.weight": torch.zeros(1), "x": _Payload(marker)}, target)
    code, err = run(["torchvision:resnet18", "--pretrained", *NOISE], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "refusing" in err and "needs code to load (io.open)" in err
    assert not marker.exists(), "a pickle in the torch.hub cache was executed"

    repo = tmp_path / "hf" / "models--timm--resnet18.a1_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    torch.save({**state, "x": _Payload(marker)}, snapshot / "pytorch_model.bin")
    code, err = run(["timm:resnet18", "--pretrained", *NOISE], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "refusing" in err and "pytorch_model.bin" in err
    assert not marker.exists(), "a pickle in the Hugging Face cache was executed"


def test_cli_pretrained_timm_from_hugging_face_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    timm = pytest.importorskip("timm")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    code, err = run(["timm:resnet18", "--pretrained", *NOISE], capsys)
    assert code == 2 and "timm/resnet18.a1_in1k" in err and "never downloads" in err
    # The Hugging Face cache layout that timm.create_model(pretrained=True) leaves behind.
    torch.manual_seed(5)
    cached = timm.create_model("resnet18", pretrained=False)
    repo = tmp_path / "hf" / "models--timm--resnet18.a1_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    safetensors_torch.save_file(cached.state_dict(), str(snapshot / "model.safetensors"))
    out = tmp_path / "out"
    code, err = run(["timm:resnet18", "--pretrained", *NOISE, "--out", str(out)], capsys)
    assert code == 0, err
    np.testing.assert_allclose(probe_maps(out)["layer1"], expected_maps(cached, "layer1"),
                               rtol=1e-5, atol=1e-9)  # fmt: skip
