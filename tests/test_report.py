"""``erf-monitor report`` on logs written by a real Lightning fit (CSV + TensorBoard)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("tensorboard")

from erf_monitor.cli import main  # noqa: E402
from erf_monitor.cli.report import build_report, find_runs  # noqa: E402
from erf_monitor.integrations.lightning import ERFMonitor  # noqa: E402

EVIL = "conv<b>&1"  # a layer name that must be escaped in the HTML


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.add_module(EVIL, nn.Conv2d(1, 4, 3, padding=1))
        self.conv2 = nn.Conv2d(4, 2, 3, padding=2, dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(getattr(self, EVIL)(x)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x).mean((2, 3)), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    root = tmp_path_factory.mktemp("logs")
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(48, 1, 16, 16, generator=gen), torch.randint(0, 2, (48,), generator=gen)
    )
    trainer = pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=[CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tb")],
        callbacks=[
            ERFMonitor(
                layers=[EVIL, "conv2"],
                every_n_steps=2,
                num_samples=4,
                min_coverage={EVIL: 0.5, "conv2": 0.01},
                summary=False,
            )
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    with pytest.warns(Warning):  # the 3x3 conv cannot cover half of the 16x16 input: alert
        trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8))
    return root


def test_finds_both_sources(logdir: Path) -> None:
    runs = {run.source: run for run in find_runs(logdir)}
    assert set(runs) == {"files", "tensorboard"}
    for run in runs.values():
        assert set(run.metrics) == {EVIL, "conv2"}
        steps = [s for s, _ in run.metrics["conv2"]["coverage"]]
        assert steps == [0, 2, 4, 6]
        assert [s for s, _ in run.frames[EVIL]] == [0, 2, 4, 6]
        assert any(title.endswith(EVIL) for _, title, _ in run.alerts)
        assert run.thresholds() == pytest.approx({EVIL: 0.5, "conv2": 0.01})  # logged
    # same numbers from both backends (TensorBoard stores float32)
    files, tb = runs["files"], runs["tensorboard"]
    for layer in (EVIL, "conv2"):
        np.testing.assert_allclose(
            [v for _, v in files.metrics[layer]["erf_size"]],
            [v for _, v in tb.metrics[layer]["erf_size"]],
        )
    assert "train_loss" in files.other and "train_loss" in tb.other


def test_html_report(logdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    assert main(["report", str(logdir), "--out", str(out), "--frames", "3"]) == 0
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert '<img src="data:image/png;base64,' in page
    assert EVIL not in page
    assert "conv&lt;b&gt;&amp;1" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    # every inlined image is a real PNG
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    # One fit logged to CSV and TensorBoard: identical ERF data, shown once (the newest),
    # the other listed. Curves, training curves, 2 layers x 3 frames.
    assert len(images) == 1 + 1 + 2 * 3
    assert "The same ERF data are also in" in page
    # 4 probes (steps 0, 2, 4, 6), 3 frames: the strip says which it left out
    assert page.count("3 of 4 probes shown, evenly spaced (steps 0, 4, 6)") == 2  # 2 layers
    from PIL import Image

    for b64 in images:
        Image.open(io.BytesIO(base64.b64decode(b64))).verify()


def test_maps_only_and_no_pickle(tmp_path: Path) -> None:
    """A FileSink directory without PNGs: frames come from the npz maps; pickles are refused."""
    from erf_monitor.sinks import FileSink

    sink = FileSink(tmp_path / "run")
    for step in (0, 5):
        sink.log_scalars({"erf/a/coverage": 0.1 * (step + 1), "erf/a/erf_size": 3.0 + step}, step)
        sink.log_arrays("erf", {"a": np.random.default_rng(step).random((8, 8))}, step)
    np.savez(tmp_path / "run" / "erf_maps" / "step_9.npz", a=np.array([{"x": 1}], dtype=object))
    (run,) = find_runs(tmp_path)
    assert [s for s, _ in run.frames["a"]] == [0, 5]
    path, _ = build_report(tmp_path)
    assert path == tmp_path / "erf_report.html"
    assert '<img src="data:image/png;base64,' in path.read_text()


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no ERF data" in capsys.readouterr().err


# ----------------------------------------------------------------------------- several runs
def _file_run(path: Path, sizes: list[float], *, threshold: float | None = None) -> None:
    from erf_monitor.sinks import FileSink

    sink = FileSink(path)
    for i, size in enumerate(sizes):
        scalars = {"erf/head/erf_size": size, "erf/head/coverage": (size / 32) ** 2}
        if threshold is not None:
            scalars["erf/head/min_coverage"] = threshold
        sink.log_scalars(scalars, 10 * i)


def test_runs_side_by_side_in_natural_order(tmp_path: Path) -> None:
    _file_run(tmp_path / "run_10", [5, 9, 13], threshold=0.1)
    _file_run(tmp_path / "run_2", [5, 7, 9])
    path, runs = build_report(tmp_path)
    assert [r.name for r in runs] == ["run_2", "run_10"]  # not alphabetical
    assert runs[1].thresholds() == {"head": 0.1} and runs[0].thresholds() == {}
    page = path.read_text()
    assert "Runs side by side" in page
    assert page.index("run_2") < page.index("run_10")
    # a run with no threshold still gets a threshold line: the reference
    assert "reference coverage 5% (this run logged no min_coverage)" in page
    assert "Dashed: each checked layer" in page


def test_reruns_are_shown_once(tmp_path: Path) -> None:
    import shutil
    import time

    _file_run(tmp_path / "a" / "version_0", [5, 9, 13])
    time.sleep(0.01)
    shutil.copytree(tmp_path / "a" / "version_0", tmp_path / "a" / "version_1")
    os.utime(tmp_path / "a" / "version_1" / "metrics.csv")  # the newer rerun
    _file_run(tmp_path / "b", [5, 9, 15])  # different data: kept
    _, runs = build_report(tmp_path)
    assert [r.name for r in runs] == ["a/version_1", "b"]
    assert runs[0].duplicates == ["a/version_0 (files)"] and runs[1].duplicates == []
    _, every = build_report(tmp_path, dedupe=False)
    assert len(every) == 3


def test_identical_curves_stay_visible_and_filmstrips_wrap(tmp_path: Path) -> None:
    from erf_monitor.cli.report import _comparison_figure

    _file_run(tmp_path / "a", [5, 9, 13])
    _file_run(tmp_path / "b", [5, 9, 13])  # the same curve, kept with --keep-duplicates
    path, runs = build_report(tmp_path, dedupe=False)
    fig = _comparison_figure("head", runs, 0.05)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()][:2] == ["a", "b (same as a)"]
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label() in ("a", "b (same as a)")]
    # the curve drawn second does not cover the first: a thinner line, smaller hollow markers
    assert lines[0].get_linewidth() > lines[1].get_linewidth()
    assert lines[0].get_markersize() > lines[1].get_markersize()
    assert lines[1].get_markerfacecolor() == "none"
    page = path.read_text()
    assert ".strip{display:flex;flex-wrap:wrap" in page and "overflow-x" not in page


def test_analyze_output_is_a_run(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    out = tmp_path / "logs" / "resnet18"
    args = ["analyze", "torchvision:resnet18", "--input-size", "32", "--samples", "1"]
    args += ["--position", "corners"]  # also writes fields/<layer>.png
    assert main([*args, "--layers", "layer1", "layer2", "--out", str(out), "--quiet"]) == 0
    _file_run(tmp_path / "logs" / "trained", [5, 9, 13])
    runs = find_runs(tmp_path / "logs")
    (analyzed,) = [r for r in runs if r.source == "analyze"]
    assert analyzed.name == "resnet18" and set(analyzed.metrics) == {"layer1", "layer2"}
    record = json.loads((out / "metrics.json").read_text())
    size = record["layers"]["layer2"]["metrics"]["erf_size"]
    assert analyzed.metrics["layer2"]["erf_size"] == [(0, size)]
    assert [s for s, _ in analyzed.frames["layer1"]] == [0]
    assert analyzed.fields == {
        layer: (out / "fields" / f"{layer}.png").read_bytes() for layer in ("layer1", "layer2")
    }
    path, _ = build_report(tmp_path / "logs")
    page = path.read_text()
    assert "erf-monitor analyze output" in page
    section = page[page.index("erf-monitor analyze output") :]
    section = section[: section.index("</section>")]
    # one probe: the layers side by side, no growth curves of one dot; the fields included
    assert "ERF by layer" in section and "Growth over training" not in section
    assert "ERF at several positions" in section and section.count("ERF field of layer") == 2


def test_one_probe_is_drawn_against_layers_and_runs_not_steps(tmp_path: Path) -> None:
    """An analyze run's plots put its layers (or, compared, the runs) on the x-axis, with the
    values of metrics.json; not one dot at step 0 on an axis from -0.04 to 0.04."""
    pytest.importorskip("torchvision")
    from erf_monitor.cli.report import _comparison_figure, _layers_figure

    args = ["analyze", "torchvision:resnet18", "--input-size", "32", "--samples", "1", "--quiet"]
    for name, seed in (("a", "0"), ("b", "1")):
        out = tmp_path / name
        assert main([*args, "--layers", "layer1", "layer2", "--out", str(out), "--seed", seed]) == 0
    runs = sorted(find_runs(tmp_path), key=lambda r: r.name)
    record = json.loads((tmp_path / "a" / "metrics.json").read_text())["layers"]
    axes = _layers_figure(runs[0], 0.05).axes
    assert axes[0].get_title().startswith("ERF size")
    for ax, metric in zip(axes, ("erf_size", "erf_trf_ratio", "coverage")):
        assert ax.get_xlim() == (-0.5, 1.5)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["layer1", "layer2"]
        line = ax.get_lines()[0]
        assert list(line.get_xdata()) == [0, 1]
        want = [record[layer]["metrics"][metric] for layer in ("layer1", "layer2")]
        assert list(line.get_ydata()) == pytest.approx(want)
    for ax in _comparison_figure("layer2", runs, 0.05).axes:
        assert ax.get_xlim() == (-0.5, 1.5)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]


# ----------------------------------------------------------------------------- the markup
class _Page(HTMLParser):
    """The page as a browser reads it: its tags, and its text (per innermost tag) and
    attribute values with the character references decoded."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.texts: list[tuple[str, str]] = []
        self.attrs: list[tuple[str, str, str]] = []
        self._open: list[str] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [(tag, name, value) for name, value in attrs if value is not None]
        if tag not in ("img", "meta"):  # void elements have no end tag
            self._open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        while self._open and self._open.pop() != tag:
            pass

    def handle_data(self, data: str) -> None:
        self.texts.append((self._open[-1] if self._open else "", data))


XSS = "<script>alert(1)</script>"
#: Every element the report uses; a name read from a file must never add one.
TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "h4", "p", "code",
        "table", "tr", "th", "td", "a", "section", "div", "b", "span", "img", "figure",
        "figcaption"}  # fmt: skip


def test_names_from_files_appear_only_escaped(tmp_path: Path) -> None:
    """A run, a layer, an alert and a title named ``<script>alert(1)</script>`` are shown as
    that text wherever the page names them (headings, tables, captions, alt texts, paths),
    and never become markup."""
    from erf_monitor.sinks import FileSink, safe_filename

    logs = tmp_path / "logs"
    heatmap = np.zeros((8, 8, 3), dtype=np.uint8)
    evil = FileSink(logs / XSS)  # the folder "<script>alert(1)<" holding "script>"
    other = FileSink(logs / "other")
    for step in (0, 10):
        evil.log_scalars({f"erf/{XSS}/coverage": 0.1, f"erf/{XSS}/min_coverage": 0.5}, step)
        evil.log_image(f"erf/{XSS}/heatmap", heatmap, step)
        other.log_scalars({f"erf/{XSS}/coverage": 0.2}, step)
        other.log_image(f"erf/{XSS}/heatmap", heatmap, step)
    evil.alert(f"erf_coverage/{XSS}", f"{XSS} covers 10%, below min_coverage=50.0%", 10)
    analyzed = logs / "analyzed"  # an analyze folder, with its field figure
    record = {"layers": {XSS: {"metrics": {"erf_size": 3.0, "coverage": 0.3}}}}
    (analyzed / "fields").mkdir(parents=True)
    (analyzed / "metrics.json").write_text(json.dumps(record))
    Image.fromarray(heatmap).save(analyzed / "fields" / f"{safe_filename(XSS)}.png")

    path, runs = build_report(logs, tmp_path / "report.html", title=XSS)
    assert sorted(r.name for r in runs) == sorted([XSS, "other", "analyzed"])
    page = path.read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    parsed = _Page(page)
    assert set(parsed.tags) <= TAGS
    texts = parsed.texts
    alts = [value for tag, name, value in parsed.attrs if tag == "img" and name == "alt"]
    for where in ("title", "h1", "a", "h2", "h3"):  # page title, run list, run, comparison
        assert (where, XSS) in texts, where
    assert texts.count(("td", XSS)) == 3  # the layer's row in each run's table
    assert texts.count(("h4", XSS)) == 3  # two heatmap strips, one field
    assert ("code", str(logs / XSS)) in texts
    assert ("b", f"step 10 · erf_coverage/{XSS}") in texts
    assert ("div", f"\n{XSS} covers 10%, below min_coverage=50.0%") in texts
    assert ("figcaption", f"{XSS} · step 10") in texts  # its last heatmap, compared
    wanted = [f"ERF growth curves of {XSS}", f"{XSS} step 0", f"{XSS} step 10"]
    wanted += [f"ERF field of {XSS}", f"{XSS}: runs compared", f"{XSS} {XSS} step 10"]
    for alt in wanted:
        assert alt in alts, alt
    # every occurrence a reader sees is an escaped one in the source
    seen = sum(t.count(XSS) for _, t in texts) + sum(v.count(XSS) for *_, v in parsed.attrs)
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == seen


def test_run_tables_show_the_logged_values(tmp_path: Path) -> None:
    """The tables' cells are the logged numbers: ERF size and coverage first → last, the
    threshold, whether it was crossed, and the steps probed."""
    _file_run(tmp_path / "checked", [5, 9, 13], threshold=0.1)
    _file_run(tmp_path / "free", [4, 6])
    path, _ = build_report(tmp_path)
    parsed = _Page(path.read_text(encoding="utf-8"))
    cells = [t for tag, t in parsed.texts if tag in ("td", "a", "span")]
    # coverage = (size / 32)^2: 25/1024 = 2.44%, 169/1024 = 16.50%, 16/1024 = 1.56%, 36/1024 = 3.52%
    checked = ["head", "3", "–", "5 → 13", "–", "2.4% → 16.5%", "10.0%", "none"]
    free = ["head", "2", "–", "4 → 6", "–", "1.6% → 3.5%", "–", "not checked"]
    assert _sublist(checked, cells) and _sublist(free, cells)
    # the list of runs: name, source, layers, steps, alerts, duplicates
    assert _sublist(["checked", "files", "1", "0–20", "0", "–"], cells)
    assert _sublist(["free", "files", "1", "0–10", "0", "–"], cells)


def _sublist(part: list[str], whole: list[str]) -> bool:
    return any(whole[i : i + len(part)] == part for i in range(len(whole) - len(part) + 1))
