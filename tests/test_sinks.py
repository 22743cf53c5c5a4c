"""Sinks against the real backends: event files, offline W&B runs, files on disk.

No logger is mocked: everything written is read back the way a user would see it.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import torch

from conftest import HANG_GUARD_S
from erf_monitor.core.imports import package_available, require
from erf_monitor.measure.result import ERFResult
from erf_monitor.sinks import (
    CSV_SUBDIR,
    CallableSink,
    FileSink,
    MLflowSink,
    MultiSink,
    Sink,
    TensorBoardSink,
    WandbSink,
    as_sink,
    log_results,
    safe_filename,
    sinks_for_trainer,
)
from erf_monitor.trf.types import TRF
from erf_monitor.viz.render import render_heatmap

LAYERS = ("layer1.0", "blocks/2")  # a dotted name and one that needs escaping in file names


def _result(name: str, size: int, sigma: float, half: int) -> ERFResult:
    c = size // 2
    grids = torch.meshgrid(
        torch.arange(size, dtype=torch.float32) - c,
        torch.arange(size, dtype=torch.float32) - c,
        indexing="ij",
    )
    heat = torch.exp(-(grids[0] ** 2 + grids[1] ** 2) / (2 * sigma**2))
    trf = TRF(
        size=(2.0 * half + 1,) * 2,
        stride=(1.0, 1.0),
        interval=((c - half, c + half),) * 2,
        clipped=((c - half, c + half),) * 2,
        global_dims=(False, False),
        centre=(float(c), float(c)),
        output_centre=(c, c),
        output_shape=(size, size),
        input_shape=(size, size),
        method="fx",
    )
    return ERFResult(
        name=name,
        heatmap=heat,
        trf=trf,
        mode="luo",
        num_samples=2,
        output_shape=(size, size),
        centre_pixel=(c, c),
    )


@pytest.fixture(scope="module")
def results() -> dict[str, ERFResult]:
    return {LAYERS[0]: _result(LAYERS[0], 24, 2.0, 5), LAYERS[1]: _result(LAYERS[1], 24, 4.0, 9)}


def _expected_scalars(results: dict[str, ERFResult]) -> dict[str, float]:
    return {f"erf/{n}/{k}": v for n, r in results.items() for k, v in r.scalars().items()}


def _decode_png(data: bytes) -> np.ndarray:
    return matplotlib.image.imread(io.BytesIO(data), format="png")


def _not_uniform(img: np.ndarray) -> bool:
    flat = img.reshape(-1, img.shape[-1])
    return len(np.unique(flat, axis=0)) > 5


# -- FileSink -------------------------------------------------------------------------------
def test_file_sink_layout_and_content(tmp_path: Path, results: dict[str, ERFResult]) -> None:
    sink = FileSink(tmp_path / "out")
    logged = log_results(sink, results, 5)
    log_results(sink, results, 10)
    sink.log_text("note", "two\nlines", 10)
    sink.alert("low coverage", "layer1.0 sees 2%", 10)

    assert logged == _expected_scalars(results)
    with (tmp_path / "out" / "metrics.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "key", "value"] and ["step", "key", "value"] not in rows[1:]
    assert len(rows) == 1 + 2 * len(logged)
    got = {(int(s), k): float(v) for s, k, v in rows[1:]}
    for step in (5, 10):
        for key, value in logged.items():
            assert got[(step, key)] == pytest.approx(value, nan_ok=True)

    for name, r in results.items():
        folder = tmp_path / "out" / "heatmaps" / safe_filename(name)
        assert sorted(p.name for p in folder.iterdir()) == ["step_10.png", "step_5.png"]
        png = matplotlib.image.imread(folder / "step_5.png")
        assert png.shape[:2] == render_heatmap(r).shape[:2] and _not_uniform(png)
    assert (tmp_path / "out" / "heatmaps" / "blocks%2F2").is_dir()  # escaped, not nested

    with np.load(tmp_path / "out" / "maps" / "step_10.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted([*LAYERS, "__mode__", "__definition__"])
        assert str(npz["__mode__"]) == "luo"
        for name, r in results.items():
            assert npz[name].dtype == np.float32
            np.testing.assert_array_equal(npz[name], r.heatmap.numpy())

    events = (tmp_path / "out" / "events.log").read_text().splitlines()
    modes = [e for e in events if "\terf/mode\t" in e]  # log_results records the mode
    assert len(modes) == 2 and modes[0].startswith("5\terf/mode\tmode=luo: ")
    events = [e for e in events if e not in modes]
    assert events[0] == "10\tnote\ttwo\\nlines"
    assert events[1] == "10\talerts/low coverage\tlayer1.0 sees 2%"
    alert = json.loads((tmp_path / "out" / "alerts.jsonl").read_text())
    assert (alert["step"], alert["title"], alert["text"]) == (
        10,
        "low coverage",
        "layer1.0 sees 2%",
    )


def test_file_sink_odd_names(tmp_path: Path) -> None:
    sink = FileSink(tmp_path)
    arrays = {"file": np.arange(3), "": np.ones(2), "a/b": np.zeros((2, 2), np.float32)}
    sink.log_arrays("erf", arrays, 1)
    with np.load(sink.arrays_path("erf", 1), allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(arrays)
        np.testing.assert_array_equal(npz["file"], np.arange(3))
    with pytest.raises(TypeError, match="object array"):
        sink.log_arrays("erf", {"x": np.array([{}], dtype=object)}, 2)
    assert safe_filename("..") == "%2E%2E" and safe_filename("") == "_root"
    assert "/" not in safe_filename("../../etc") and len(safe_filename("x" * 500)) <= 150
    image = np.zeros((4, 4, 3), np.uint8)
    sink.log_image("erf/../../x/heatmap", image, 3)
    written = list(tmp_path.rglob("step_3.png"))
    assert len(written) == 1 and written[0].is_relative_to(tmp_path / "heatmaps")


# -- TensorBoard ----------------------------------------------------------------------------
def _accumulator(logdir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.skipif(not package_available("tensorboard"), reason="tensorboard not installed")
def test_tensorboard_sink_event_file(tmp_path: Path, results: dict[str, ERFResult]) -> None:
    sink = TensorBoardSink(tmp_path / "tb")
    log_results(sink, results, 5)
    log_results(sink, results, 10)
    sink.alert("low coverage", "layer1.0 sees 2%", 10)
    sink.close()

    acc = _accumulator(tmp_path / "tb")
    expected = _expected_scalars(results)
    assert set(expected) <= set(acc.Tags()["scalars"])
    for key, value in expected.items():
        events = acc.Scalars(key)
        assert [e.step for e in events] == [5, 10]
        if np.isfinite(value):
            assert events[-1].value == pytest.approx(value, rel=1e-6, abs=1e-7)
    for name, r in results.items():
        images = acc.Images(f"erf/{name}/heatmap")
        assert [e.step for e in images] == [5, 10]
        img = _decode_png(images[-1].encoded_image_string)
        rendered = render_heatmap(r, step=10)  # titled with the layer and the step
        assert (images[-1].height, images[-1].width) == rendered.shape[:2]
        np.testing.assert_array_equal(np.round(img[..., :3] * 255).astype(np.uint8), rendered)
        assert _not_uniform(img)
    text = acc.Tensors("alerts/low coverage/text_summary")
    assert text[0].step == 10 and b"layer1.0 sees 2%" in text[0].tensor_proto.string_val[0]
    with np.load(tmp_path / "tb" / "erf_maps" / "step_5.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz[LAYERS[1]], results[LAYERS[1]].heatmap.numpy())


@pytest.mark.skipif(not package_available("tensorboard"), reason="tensorboard not installed")
def test_tensorboard_sink_never_touches_user_writer(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    sink = as_sink(writer)
    assert isinstance(sink, TensorBoardSink) and sink.log_dir == tmp_path / "erf"
    sink.log_scalars({"erf/a/coverage": 0.5}, 1)
    sink.close()
    writer.add_scalar("after", 1.0, 2)  # still open
    writer.close()
    ours, theirs = _accumulator(tmp_path / "erf"), _accumulator(tmp_path)
    assert ours.Scalars("erf/a/coverage")[0].value == 0.5 and ours.Tags()["scalars"] == [
        "erf/a/coverage"
    ]
    assert theirs.Tags()["scalars"] == ["after"]  # the monitor never wrote to the user's writer


# -- W&B (offline) --------------------------------------------------------------------------
def _wandb_history(run_dir: Path, timeout: float = HANG_GUARD_S) -> list[dict[str, Any]]:
    """History rows of an offline run, from its ``run-*.wandb`` record log (LevelDB format).

    wandb-core sometimes writes the records shortly *after* ``run.finish()`` returns (seen with
    wandb 0.31: the file still holds only its 7-byte header), so wait for the exit record.
    """
    deadline = time.monotonic() + timeout
    while True:
        rows, done = _read_wandb_log(next(run_dir.glob("run-*.wandb")))
        if done or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def _read_wandb_log(path: Path) -> tuple[list[dict[str, Any]], bool]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    rows, done = [], False
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        done = done or record.WhichOneof("record_type") == "exit"
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows, done


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    yield wandb
    wandb.finish()


def test_wandb_sink_offline_run(
    wandb_offline: Any, tmp_path: Path, results: dict[str, ERFResult]
) -> None:
    run = wandb_offline.init(project="erf-monitor-tests", dir=str(tmp_path), mode="offline")
    run.log({"loss": 1.0})  # the user's own logging keeps W&B's step
    sink = as_sink(run)
    assert isinstance(sink, WandbSink)
    log_results(sink, results, 5)
    log_results(sink, results, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # run.alert may or may not work offline
        sink.alert("low coverage", "layer1.0 sees 2%", 10)
    run_dir = Path(run.dir).parent
    run.finish()

    images = sorted((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert len(images) == 2 * len(results)
    for path in images:
        img = matplotlib.image.imread(path)
        shape = render_heatmap(next(iter(results.values())), step=5).shape
        assert img.shape[:2] == shape[:2] and _not_uniform(img)  # the annotated picture
    with np.load(run_dir / "files" / "erf_maps" / "step_10.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz[LAYERS[0]], results[LAYERS[0]].heatmap.numpy())

    history = _wandb_history(run_dir)
    scalar_rows = [h for h in history if f"erf/{LAYERS[0]}/coverage" in h]
    assert [h["erf/step"] for h in scalar_rows] == [5, 10]
    expected = _expected_scalars(results)
    for key, value in expected.items():
        if np.isfinite(value):
            assert scalar_rows[-1][key] == pytest.approx(value)
    steps = [h["_step"] for h in history if "_step" in h]
    assert steps == sorted(steps)  # W&B's own step stays monotonic
    assert any(h.get(f"erf/{LAYERS[1]}/heatmap/_type") == "image-file" for h in history)
    assert any("alerts/low coverage/_type" in h for h in history)


# -- fan-out, callables, factories -----------------------------------------------------------
class _Broken(Sink):
    def __repr__(self) -> str:
        return "BrokenSink()"

    def log_scalars(self, scalars: Any, step: int) -> None:
        raise RuntimeError("disk on fire")

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        raise OSError("no space")


def test_failing_sink_warns_once_and_others_still_get_data(
    tmp_path: Path, results: dict[str, ERFResult]
) -> None:
    good = FileSink(tmp_path)
    with pytest.warns(UserWarning) as record:
        log_results([_Broken(), good], results, 1)
        log_results([_Broken(), good], results, 2)
    messages = [str(w.message) for w in record]
    assert any("BrokenSink()" in m and "disk on fire" in m for m in messages)
    assert any("BrokenSink()" in m and "no space" in m for m in messages)
    assert len([m for m in messages if "no space" in m]) == 2  # one per MultiSink (per call)
    assert len(list((tmp_path / "heatmaps").rglob("*.png"))) == 2 * len(results)
    multi = MultiSink([_Broken(), good])
    with pytest.warns(UserWarning) as record:
        for step in range(3):
            log_results(multi, results, step)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2  # log_scalars and log_image, each reported once
    assert "no space" in messages[0] and "disk on fire" in messages[1]  # log_image < log_scalars


def test_callable_sink_one_call_per_step(results: dict[str, ERFResult]) -> None:
    calls: list[tuple[int, dict[str, float], dict[str, np.ndarray]]] = []
    texts: list[tuple[int, str, str]] = []
    sink = as_sink(lambda step, scalars, images: calls.append((step, scalars, images)))
    assert isinstance(sink, CallableSink)
    sink.on_text = lambda step, key, text: texts.append((step, key, text))
    log_results(sink, results, 3)
    log_results(sink, results, 4, mode_text=False)
    sink.alert("x", "y", 4)
    assert [c[0] for c in calls] == [3, 4]
    assert calls[0][1] == _expected_scalars(results)
    assert sorted(calls[0][2]) == sorted(f"erf/{n}/heatmap" for n in LAYERS)
    img = calls[0][2][f"erf/{LAYERS[0]}/heatmap"]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert texts[1:] == [(4, "alerts/x", "y")]
    assert texts[0][:2] == (3, "erf/mode") and texts[0][2].startswith("mode=luo: Luo et al.")


def test_as_sink_kinds_and_errors(tmp_path: Path) -> None:
    file_sink = as_sink(tmp_path / "d")
    assert isinstance(file_sink, FileSink) and as_sink(file_sink) is file_sink
    assert isinstance(as_sink(str(tmp_path / "e")), FileSink)
    multi = as_sink([tmp_path / "f", print])
    assert isinstance(multi, MultiSink) and len(multi.sinks) == 2
    with pytest.raises(TypeError, match=r"SummaryWriter.*wandb run.*directory"):
        as_sink(42)


def test_require_message() -> None:
    require("numpy", "x")
    with pytest.raises(ModuleNotFoundError, match=r"pip install erf-monitor\[wandb\]"):
        require("surely_missing_pkg_erf", "wandb", "WandbSink")


def test_mlflow_sink_needs_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    # mlflow is installed in CI: simulate its absence (None in sys.modules: not importable).
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert not package_available("mlflow")
    with pytest.raises(ModuleNotFoundError, match="MLflowSink needs mlflow"):
        MLflowSink(object(), "run")


def test_mlflow_sink_real(tmp_path: Path, results: dict[str, ERFResult]) -> None:
    mlflow = pytest.importorskip("mlflow")
    # A sqlite store: mlflow 3 refuses the plain file store unless MLFLOW_ALLOW_FILE_STORE is set.
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    # Artifacts go under tmp_path too (the default would be ./mlruns in the working directory).
    exp = client.create_experiment("erf", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    sink = MLflowSink(client, run_id)
    log_results(sink, results, 5)
    history = client.get_metric_history(run_id, f"erf/{LAYERS[0]}/coverage")
    assert [m.step for m in history] == [5]
    assert history[0].value == pytest.approx(results[LAYERS[0]].coverage)


def test_import_does_not_pull_optional_packages() -> None:
    code = (
        "import sys, erf_monitor.sinks, erf_monitor.viz.render, erf_monitor.core.imports\n"
        "heavy = ['lightning', 'pytorch_lightning', 'wandb', 'tensorboard', 'mlflow',"
        " 'matplotlib']\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# -- Lightning trainers -----------------------------------------------------------------------
@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_sinks_for_trainer(
    package: str, tmp_path: Path, wandb_offline: Any, results: dict[str, ERFResult]
) -> None:
    pl = pytest.importorskip(package)
    loggers = pytest.importorskip(f"{package}.loggers")
    tb = loggers.TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    csv_logger = loggers.CSVLogger(save_dir=str(tmp_path), name="csv")
    wb = loggers.WandbLogger(save_dir=str(tmp_path), offline=True, project="erf-tests")

    class Custom(loggers.Logger):
        name = "custom"
        version = 0

        def log_metrics(self, metrics: Any, step: Any = None) -> None: ...

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None: ...

    trainer = pl.Trainer(
        logger=[tb, csv_logger, wb, Custom()],
        default_root_dir=str(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    with pytest.warns(UserWarning, match="no sink for logger.*Custom"):
        sinks = sinks_for_trainer(trainer)
    assert [type(s) for s in sinks] == [TensorBoardSink, FileSink, WandbSink]
    tb_sink, file_sink, wandb_sink = sinks
    assert isinstance(tb_sink, TensorBoardSink) and tb_sink.log_dir == Path(tb.log_dir) / "erf"
    assert isinstance(file_sink, FileSink)
    assert file_sink.directory == Path(csv_logger.log_dir) / CSV_SUBDIR
    assert isinstance(wandb_sink, WandbSink) and wandb_sink.run is wb.experiment
    assert wandb_sink.extra_step_keys == ("trainer/global_step",)

    log_results(sinks, results, 7)
    for s in sinks:
        s.close()
    tb.experiment.flush()
    acc = _accumulator(Path(tb.log_dir) / "erf")
    assert acc.Scalars(f"erf/{LAYERS[0]}/coverage")[0].step == 7
    assert (file_sink.directory / "metrics.csv").exists()
    run_dir = Path(wb.experiment.dir).parent
    wb.experiment.finish()
    pngs = glob.glob(str(run_dir / "files" / "media" / "images" / "**" / "*.png"), recursive=True)
    listing = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert pngs, f"no PNG under {run_dir}: {listing}"
    history = _wandb_history(run_dir)
    rows = [h for h in history if f"erf/{LAYERS[0]}/coverage" in h]
    assert rows, f"no ERF rows in {len(history)} history rows"
    assert rows[0]["trainer/global_step"] == 7 and rows[0]["erf/step"] == 7
