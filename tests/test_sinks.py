"""Sinks against the real backends: event files, offline W&B runs, files on disk.

No logger is mocked: everything written is read back the way a user would see it.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import torch

from erf_monitor.core.imports import package_available, require
from erf_monitor.measure.result import ERFResult
from erf_monitor.sinks import (
    CSV_SUBDIR,
    CallableSink,
    FileSink,
    LoggerSink,
    MLflowSink,
    MultiSink,
    Sink,
    TensorBoardSink,
    WandbSink,
    as_sink,
    log_results,
    pick_metrics,
    safe_filename,
    sinks_for_trainer,
)
from erf_monitor.sinks._metrics import METRIC_NAMES
from erf_monitor.sinks._tensorboard import key_from_tag, tb_tag
from erf_monitor.trf.types import TRF
from erf_monitor.viz.render import render_heatmap
from wandb_records import wandb_alerts, wandb_history, wandb_summary

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


#: What a 2-D layer logs by default (the README's numbers; the Lightning guide's table).
DEFAULT_2D = {
    "erf_size", "coverage", "erf_trf_ratio", "area_t50",
    "sigma_y", "sigma_x", "centroid_offset_y", "centroid_offset_x",
}  # fmt: skip


def _expected_scalars(
    results: dict[str, ERFResult], names: set[str] | None = DEFAULT_2D
) -> dict[str, float]:
    """The scalars of ``results`` named ``names`` (all of them for ``None``)."""
    return {
        f"erf/{n}/{k}": v
        for n, r in results.items()
        for k, v in r.scalars().items()
        if names is None or k in names
    }


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

    with np.load(tmp_path / "out" / "erf_maps" / "step_10.npz", allow_pickle=False) as npz:
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


# -- which metrics are logged ----------------------------------------------------------------
def test_file_sink_cuts_a_torn_last_row_before_appending(tmp_path: Path) -> None:
    """A crash (or a full disk) in an earlier run left half a row: the next append starts on
    a whole row instead of being glued onto it, in every appended file."""
    sink = FileSink(tmp_path)
    sink.log_scalars({"erf/a/sigma_x": 1.5}, 1)
    with sink.metrics_path.open("a", newline="") as f:
        f.write("2,erf/a/sigma_y,1")  # torn: the value was 12.0
    (tmp_path / "alerts.jsonl").write_text('{"step": 1, "title": "a"')
    sink.log_scalars({"erf/a/sigma_y": 17.0}, 3)
    sink.alert("erf_coverage/a", "low", 3)
    with sink.metrics_path.open(newline="") as f:
        assert list(csv.reader(f)) == [
            ["step", "key", "value"], ["1", "erf/a/sigma_x", "1.5"], ["3", "erf/a/sigma_y", "17.0"]
        ]  # fmt: skip
    (alert,) = [json.loads(x) for x in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert alert["step"] == 3 and alert["text"] == "low"


def test_file_sink_failed_image_and_array_writes_leave_no_file(tmp_path: Path) -> None:
    sink = FileSink(tmp_path)
    with pytest.raises(TypeError):
        sink.log_image("erf/a/heatmap", np.zeros((4, 4, 3), dtype=np.float32), 0)  # not uint8
    with pytest.raises(TypeError, match="object array"):
        sink.log_arrays("erf", {"a": np.zeros(3), "b": np.array([None], dtype=object)}, 0)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_pick_metrics_default_all_and_names(results: dict[str, ERFResult]) -> None:
    everything = results[LAYERS[0]].scalars()
    assert len(everything) > 30 and set(pick_metrics(everything)) == DEFAULT_2D
    assert pick_metrics(everything, "all") == everything
    picked = pick_metrics(everything, ["sigma", "area_t*", "gaussian_r2"])
    assert set(picked) == {"sigma_y", "sigma_x", "gaussian_r2"} | {
        f"area_t{t}" for t in (20, 30, 50, 99)
    }  # a per-axis base name, a glob, a name; never sigma_major/minor
    assert all(picked[k] == everything[k] for k in picked)
    logged = log_results(Sink(), results, 1, metrics=["coverage"], extra={"erf/x": 2.0})
    assert logged == {**{f"erf/{n}/coverage": results[n].coverage for n in LAYERS}, "erf/x": 2.0}


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_every_metric_of_scalars_has_a_name(ndim: int) -> None:
    """The names users may ask for cover every key ``scalars()`` returns (1-, 2-, 3-D, with
    a field of positions), and the default set is 8 keys per 2-D layer (<= 10 with a field)."""
    import erf_monitor as em

    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[ndim]
    net = torch.nn.Sequential(conv(1, 2, 3, padding=1), torch.nn.ReLU(), conv(2, 2, 3, padding=1))
    x = torch.randn(2, 1, *([9] * ndim))
    r = em.compute_erf(net, x, ["2"], position="corners" if ndim == 2 else "centre")["2"]
    keys = r.scalars()
    assert pick_metrics(keys, list(METRIC_NAMES)) == keys
    default = pick_metrics(keys)
    assert len(default) == {1: 6, 2: 9, 3: 10}[ndim]  # 2-D: 8 + border_ratio (a field)


def test_unknown_metric_names_fail_at_construction() -> None:
    import erf_monitor as em

    with pytest.raises(ValueError, match=r"'coverag' names no metric; valid names .*erf_size"):
        em.MonitorOptions(metrics=["coverag"])
    with pytest.raises(TypeError, match=r"metrics=\[name\]"):
        em.MonitorOptions(metrics="coverage")  # type: ignore[arg-type]
    assert em.MonitorOptions(metrics=["sigma", "area_t*"]).metrics == ("sigma", "area_t*")
    assert em.MonitorOptions(metrics="all").metrics == "all"


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
    expected = {tb_tag(k): v for k, v in _expected_scalars(results).items()}
    assert set(expected) <= set(acc.Tags()["scalars"])
    for key, value in expected.items():
        events = acc.Scalars(key)
        assert [e.step for e in events] == [5, 10]
        if np.isfinite(value):
            assert events[-1].value == pytest.approx(value, rel=1e-6, abs=1e-7)
    for name, r in results.items():
        images = acc.Images(f"erf/heatmap/{name}")  # metric first (tb_tag)
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


def _layout(acc: Any) -> dict[str, dict[str, list[str]]]:
    """The Custom Scalars layout of a run: ``{section: {card: [tag regex, ...]}}``."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    (event,) = acc.Tensors("custom_scalars__config__")[-1:]
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    return {
        c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart}
        for c in layout.category
    }


@pytest.mark.skipif(not package_available("tensorboard"), reason="tensorboard not installed")
def test_tensorboard_custom_scalars_one_card_per_layer(
    tmp_path: Path, results: dict[str, ERFResult]
) -> None:
    import re

    sink = TensorBoardSink(tmp_path / "tb")
    log_results(sink, results, 5, extra={f"erf/{LAYERS[0]}/min_coverage": 0.1})
    log_results(sink, results, 10)
    acc = _accumulator(tmp_path / "tb")
    tags = acc.Tags()["scalars"]
    layout = _layout(acc)
    assert list(layout) == [
        "erf: coverage, ERF/TRF ratio and min_coverage",
        "erf: ERF size, sigma and centroid offset (px)",
    ]
    wanted = [
        {"coverage", "erf_trf_ratio", "min_coverage"},
        {"erf_size", "sigma_y", "sigma_x", "centroid_offset_y", "centroid_offset_x"},
    ]
    for cards, metrics in zip(layout.values(), wanted):
        assert list(cards) == list(LAYERS)  # one card per layer
        for layer, (regex,) in cards.items():
            drawn = {t for t in tags if re.match(regex, t)}
            if layer != LAYERS[0]:
                metrics = metrics - {"min_coverage"}  # logged for the first layer only
            assert drawn == {tb_tag(f"erf/{layer}/{m}") for m in metrics}
    assert len(acc.Tensors("custom_scalars__config__")) == 1  # written once: layers are known


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
    assert ours.Scalars("erf/1_coverage/a")[0].value == 0.5 and ours.Tags()["scalars"] == [
        "erf/1_coverage/a"
    ]
    assert theirs.Tags()["scalars"] == ["after"]  # the monitor never wrote to the user's writer


# -- W&B (offline) --------------------------------------------------------------------------
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
    log_results(sink, results, 10, flush=False)  # as a monitor does: its alerts come next
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # run.alert works offline: no fallback
        sink.alert("low coverage", "layer1.0 sees 2%", 10)
    sink.flush()
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

    history = wandb_history(run_dir)
    scalar_rows = [h for h in history if f"erf/{LAYERS[0]}/coverage" in h]
    assert [h["erf/step"] for h in scalar_rows] == [5, 10]
    expected = _expected_scalars(results)
    for key, value in expected.items():
        if np.isfinite(value):
            assert scalar_rows[-1][key] == pytest.approx(value)
    # One history row per probe (scalars and heatmaps together; the alert is a run.alert),
    # so W&B's own step advances by one per probe (0 is the user's loss).
    assert [h["_step"] for h in history] == [0, 1, 2]
    assert [h.get("erf/step") for h in history] == [None, 5, 10]
    for row in history[1:]:
        assert all(row.get(f"erf/{n}/heatmap/_type") == "image-file" for n in LAYERS)
    assert not any(k.startswith("erf/mode") for h in history for k in h)  # no table to chart
    assert wandb_summary(run_dir)["erf/mode"].startswith("mode=luo")
    # The alert is one run.alert at WARN, not also a table in the history.
    assert not any(k.startswith("alerts/") for h in history for k in h)
    assert wandb_alerts(run_dir) == [("low coverage", "[step 10] layer1.0 sees 2%", "WARN")]


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

        def __init__(self) -> None:
            super().__init__()
            self.logged: list[tuple[Any, dict[str, float]]] = []

        def log_metrics(self, metrics: Any, step: Any = None) -> None:
            self.logged.append((step, dict(metrics)))

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None: ...

    custom = Custom()

    trainer = pl.Trainer(
        logger=[tb, csv_logger, wb, custom],
        default_root_dir=str(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every logger has a sink: no "no sink" warning
        sinks = sinks_for_trainer(trainer)
    assert [type(s) for s in sinks] == [TensorBoardSink, LoggerSink, WandbSink, LoggerSink]
    tb_sink, csv_sink, wandb_sink, custom_sink = sinks
    assert isinstance(tb_sink, TensorBoardSink) and tb_sink.log_dir == Path(tb.log_dir) / "erf"
    assert isinstance(csv_sink, LoggerSink) and csv_sink.logger is csv_logger
    assert csv_sink.files is not None
    assert csv_sink.files.directory == Path(csv_logger.log_dir) / CSV_SUBDIR
    assert isinstance(wandb_sink, WandbSink) and wandb_sink.run is wb.experiment
    assert wandb_sink.extra_step_keys == ()  # Lightning's axis would go back (test_dashboards)
    assert isinstance(custom_sink, LoggerSink) and custom_sink.files is None

    log_results(sinks, results, 7)
    for s in sinks:
        s.close()
    tb.experiment.flush()
    acc = _accumulator(Path(tb.log_dir) / "erf")
    assert acc.Scalars(tb_tag(f"erf/{LAYERS[0]}/coverage"))[0].step == 7
    header = (Path(csv_logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert f"erf/{LAYERS[0]}/coverage" in header.split(",")
    assert list((csv_sink.files.directory / "heatmaps").rglob("step_7.png"))
    assert (csv_sink.files.directory / "erf_maps" / "step_7.npz").is_file()
    assert [step for step, _ in custom.logged] == [7]
    assert custom.logged[0][1] == pytest.approx(_expected_scalars(results))
    run_dir = Path(wb.experiment.dir).parent
    wb.experiment.finish()
    pngs = glob.glob(str(run_dir / "files" / "media" / "images" / "**" / "*.png"), recursive=True)
    listing = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert pngs, f"no PNG under {run_dir}: {listing}"
    history = wandb_history(run_dir)
    rows = [h for h in history if f"erf/{LAYERS[0]}/coverage" in h]
    assert rows, f"no ERF rows in {len(history)} history rows"
    assert rows[0]["erf/step"] == 7


def test_tensorboard_tags_put_growth_first_and_read_back() -> None:
    keys = [
        f"erf/{layer}/{m}"
        for layer in ("0", "1", "layer1.0")
        for m in ("area_t50", "centroid_offset_x", "erf_trf_ratio", "erf_size", "coverage")
    ]
    tags = sorted(tb_tag(k) for k in [*keys, "erf/probe_time_s", "erf/0/min_coverage"])
    assert tags[:9] == [
        f"erf/{m}/{layer}"
        for m in ("1_coverage", "2_erf_size", "3_erf_trf_ratio")
        for layer in ("layer1.0", "layer_0", "layer_1")
    ]
    assert {key_from_tag(t) for t in tags} == {*keys, "erf/probe_time_s", "erf/0/min_coverage"}
    assert key_from_tag("erf/layer4/coverage") == "erf/layer4/coverage"  # an older run's tag


@pytest.mark.skipif(not package_available("tensorboard"), reason="tensorboard not installed")
def test_tensorboard_growth_chart_at_every_probe_shows_what_a_new_chart_shows(
    tmp_path: Path,
) -> None:
    from erf_monitor.sinks._growth import GrowthChart

    # Steps of 50 000: the step axis' labels change width (and gain a "1e6" offset), so the
    # kept figure must lay itself out again; "late" appears at the fifth probe.
    sink = TensorBoardSink(tmp_path / "tb")
    series: dict[str, dict[int, float]] = {}
    references = []
    steps = [p * 50_000 for p in range(24)]
    for p, step in enumerate(steps):
        coverage = {"stem": 0.1 + 0.02 * p, "block1": 0.3 + 0.01 * (p % 5), "head": 0.9}
        if p >= 4:
            coverage["late"] = 0.04 * (p - 3)
        scalars = {f"erf/{k}/coverage": v for k, v in coverage.items()}
        scalars["erf/stem/min_coverage"] = 0.25
        sink.log_scalars(scalars, step)
        for k, v in coverage.items():
            series.setdefault(k, {})[step] = v
        references.append(GrowthChart().image(series, {"stem": 0.25}))  # a new figure each
    sink.close()
    images = _accumulator(tmp_path / "tb").Images("erf/0_growth")
    assert [e.step for e in images] == steps  # one chart per probe
    for p, (event, reference) in enumerate(zip(images, references)):
        drawn = np.round(_decode_png(event.encoded_image_string)[..., :3] * 255).astype(np.uint8)
        assert drawn.shape == reference.shape
        if p in (0, 4):  # a new figure: the layers changed
            np.testing.assert_array_equal(drawn, reference)
        # The kept figure's layout may settle a pixel apart from a new one's; the rest is the
        # same drawing, and nothing reaches the image's edges (no label cut off).
        assert np.mean(np.any(drawn != reference, axis=-1)) < 0.05, p
        for edge in (drawn[:, :2], drawn[:, -2:], drawn[:2], drawn[-2:]):
            assert (edge == 255).all(), p
