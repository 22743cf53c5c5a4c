"""``erf-monitor report``: one self-contained HTML page from what the sinks wrote.

Sources, found anywhere under the log directory:

* **FileSink directories**: ``metrics.csv`` in long format ``step,key,value``,
  ``heatmaps/<layer>/step_<N>.png``, ``erf_maps/step_<N>.npz`` and ``alerts.jsonl``;
  Lightning's own wide ``metrics.csv`` one level up adds training curves.
* **Lightning ``CSVLogger`` directories**: the ERF columns (``erf/<layer>/<metric>``) of the
  wide ``metrics.csv``, the other columns as training curves, and the monitor's heatmaps,
  maps and alerts in ``erf/`` next to it.
* **TensorBoard runs**: event files read with ``EventAccumulator`` (scalars
  ``<prefix>/<layer>/<metric>``, images ``<prefix>/<layer>/heatmap``, alert texts), plus
  ``erf_maps/step_<N>.npz`` when the event files hold no images. The monitor's own run
  ``<log_dir>/erf`` is reported under ``<log_dir>``'s name, with the training curves of the
  event files next to it.
* **``erf-monitor analyze --out`` folders**: ``metrics.json``, ``maps.npz``,
  ``heatmaps/<layer>.png`` and ``fields/<layer>.png`` (``--position``): one probe, at step 0,
  drawn against the layers instead of as growth curves.

The page lists the runs (natural order: ``version_2`` before ``version_10``), then puts runs
side by side (one plot per layer shared by several runs, one line per run, and their last
heatmaps next to each other), then one section per run. Coverage plots always show a
threshold: the ``min_coverage`` the monitor logged (``<prefix>/<layer>/min_coverage``, or the
one quoted by an alert), else a grey reference line (``reference_coverage``). Runs whose ERF
data are identical (a rerun with the same seed, one fit logged to CSV and TensorBoard) are
shown once, listing where else the same data are.

Everything read is data, and only data inside the log directory: every file is opened only
if its real path (symbolic links resolved) lies inside the directory's real path, and no
directory outside it is listed; ``.npz`` files are loaded with ``allow_pickle=False``, PNGs
are copied as bytes (an empty or unreadable one, left by a failed write, is skipped). The
page is drawn by the Jinja2 templates in ``cli/templates/`` (``report.html.j2`` and the run
and comparison sections it includes), which autoescape every value, so every name (layers,
runs, paths, alert texts) appears escaped; this module only gathers the data they show.
Images are inlined as base64 PNG; the page needs no other file and no network. The page is
written to a temporary file in its folder and renamed into place: a symbolic link planted
under its name is replaced, never written through.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime as _dt
import functools
import io
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from os import PathLike
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote

import jinja2
import numpy as np

from erf_monitor.cli.errors import CLIError

__all__ = ["ReportError", "Run", "build_report", "dedupe_runs", "find_runs", "render_html"]

#: Metric names of ``ERFResult.scalars()``; a scalar key ``<prefix>/<layer>/<metric>`` whose
#: last part is one of these (or matches the per-axis/area patterns) is an ERF metric.
_METRICS = {
    "coverage", "erf_size", "erf_trf_ratio", "trf_size", "trf_size_clipped", "trf_global",
    "trf_data_dependent", "min_coverage",
}  # fmt: skip
_METRIC_PATTERN = re.compile(
    r"^(area_t\d+|sigma_\w+|centroid_offset_\w+|gaussian_r2|disc_mass_r\d+|gauss_fit_\w+"
    r"|gridding_period_\w+|coverage_trf|erf_size_visible|anisotropy|axis_angle|cross_score"
    r"|dead_fraction|border_ratio)$"
)
#: The three growth curves, with their axis labels.
_CURVES = (
    ("erf_size", "ERF size (95%-mass square, px)"),
    ("erf_trf_ratio", "ERF / TRF (clipped)"),
    ("coverage", "coverage (fraction of input)"),
)
_THRESHOLD = re.compile(r"min_coverage=([0-9.]+)%")
_TB_SUBDIR = "erf"  # sinks.TB_SUBDIR, without importing the sinks here
_CSV_SUBDIR = "erf"  # sinks.CSV_SUBDIR


class ReportError(CLIError):
    """Nothing to report (no log directory, or no ERF data in it)."""


Series = list[tuple[int, float]]


@dataclass
class Run:
    """Everything the report shows for one run."""

    name: str
    source: str  # "files", "tensorboard" or "analyze"
    path: Path
    #: ``{layer: {metric: [(step, value), ...]}}`` sorted by step.
    metrics: dict[str, dict[str, Series]] = field(default_factory=dict)
    #: ``{layer: [(step, png_bytes), ...]}`` sorted by step.
    frames: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    #: ``[(step, title, text)]``.
    alerts: list[tuple[int, str, str]] = field(default_factory=list)
    #: Other scalars (training loss, accuracy...): ``{key: [(step, value)]}``.
    other: dict[str, Series] = field(default_factory=dict)
    #: Newest modification time of the files read (seconds since the epoch).
    mtime: float = 0.0
    #: Where else the same ERF data were found (dropped by :func:`dedupe_runs`).
    duplicates: list[str] = field(default_factory=list)
    #: ``{layer: png_bytes}``: ERF fields over several positions (``analyze --position``).
    fields: dict[str, bytes] = field(default_factory=dict)

    def single_probe(self) -> bool:
        """Whether every metric has at most one step (an ``analyze`` folder): no growth."""
        return all(len(s) <= 1 for metrics in self.metrics.values() for s in metrics.values())

    def thresholds(self) -> dict[str, float]:
        """``{layer: min_coverage}``: logged by the monitor, else quoted by an alert."""
        out: dict[str, float] = {}
        for _, title, text in self.alerts:
            m = _THRESHOLD.search(text)
            if m:
                out[title.removeprefix("erf_coverage/")] = float(m.group(1)) / 100.0
        for layer, metrics in self.metrics.items():
            logged = metrics.get("min_coverage")
            if logged:
                out[layer] = logged[-1][1]
        return out


# ---------------------------------------------------------------------------------- the folder
class _Folder:
    """Reads files only when their real path lies inside the report's root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real = os.path.realpath(root)

    def inside(self, path: Path) -> bool:
        real = os.path.realpath(path)
        return real == self.real or real.startswith(self.real.rstrip(os.sep) + os.sep)

    def is_file(self, path: Path) -> bool:
        return self.inside(path) and path.is_file()

    def entries(self, directory: Path, pattern: str = "*") -> list[Path]:
        """Names in ``directory`` matching ``pattern`` whose real paths are inside (sorted);
        nothing for a directory outside."""
        if not self.inside(directory) or not directory.is_dir():
            return []
        out = []
        for name in sorted(os.listdir(directory)):
            path = directory / name
            if fnmatchcase(name, pattern) and self.inside(path):
                out.append(path)
        return out

    def open(self, path: Path, mode: str = "r") -> IO[Any]:
        if not self.inside(path):
            raise PermissionError(f"{path} is outside the report folder")
        if "b" in mode:
            return path.open(mode)
        return path.open(mode, encoding="utf-8", newline="")

    def read_bytes(self, path: Path) -> bytes:
        with self.open(path, "rb") as f:
            data: bytes = f.read()
        return data

    def read_png(self, path: Path) -> bytes | None:
        """The PNG's bytes; ``None`` for a file that is no readable image (empty, cut short
        by a full disk, or not a PNG at all)."""
        try:
            data = self.read_bytes(path)
            from PIL import Image

            with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
                img.verify()  # every chunk's checksum, up to the end marker: cut short raises
        except Exception:  # OSError, PIL's errors, a missing PIL: not an image to embed
            return None
        return data


# ---------------------------------------------------------------------------------- parsing
def _is_metric(name: str) -> bool:
    return name in _METRICS or bool(_METRIC_PATTERN.match(name))


def _split_key(key: str) -> tuple[str, str] | None:
    """``"erf/layer1.0/coverage"`` → ``("layer1.0", "coverage")``; ``None`` if not ERF."""
    parts = key.split("/")
    if len(parts) < 3 or not _is_metric(parts[-1]):
        return None
    return "/".join(parts[1:-1]), parts[-1]


def _add(store: dict[str, dict[str, Series]], key: str, step: int, value: float) -> bool:
    split = _split_key(key)
    if split is None:
        return False
    layer, metric = split
    store.setdefault(layer, {}).setdefault(metric, []).append((step, value))
    return True


def _sort(run: Run) -> Run:
    for metrics in run.metrics.values():
        for metric, series in metrics.items():
            metrics[metric] = sorted(dict(series).items())  # last value wins per step
    for layer, frames in run.frames.items():
        run.frames[layer] = sorted(dict(frames).items())
    for key, series in run.other.items():
        run.other[key] = sorted(dict(series).items())
    run.alerts = sorted(set(run.alerts), key=lambda a: a[0])
    for metrics in run.metrics.values():
        _derive_trf(metrics)
    return run


def _derive_trf(metrics: dict[str, Series]) -> None:
    """The clipped TRF size of a layer whose run did not log it (TensorBoard and CSV runs log
    the default metrics only): ``erf_trf_ratio`` is ``erf_size`` over it, probe by probe."""
    if metrics.get("trf_size_clipped"):
        return
    ratios = dict(metrics.get("erf_trf_ratio", []))
    derived = [
        (step, float(round(size / ratios[step])))
        for step, size in metrics.get("erf_size", [])
        if step in ratios and math.isfinite(ratios[step]) and ratios[step] > 0
    ]
    if derived:
        metrics["trf_size_clipped"] = derived


_STEP_FILE = re.compile(r"^step_(\d+)\.(png|npz)$")


def _step_of(path: Path) -> int | None:
    m = _STEP_FILE.match(path.name)
    return int(m.group(1)) if m else None


def _touch(run: Run, path: Path) -> None:
    with contextlib.suppress(OSError):
        run.mtime = max(run.mtime, path.stat().st_mtime)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    try:
        from PIL import Image

        Image.fromarray(image).save(buf, format="PNG")
    except ImportError:  # pragma: no cover - PIL comes with matplotlib
        import matplotlib.image

        matplotlib.image.imsave(buf, image, format="png")
    return buf.getvalue()


def _map_frame(a: np.ndarray, size: int = 160) -> bytes | None:
    """A colormapped PNG of a raw 2-D map (for runs that saved maps but no images)."""
    from erf_monitor.viz.render import colorize

    if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
        return None
    img = colorize(a)
    factor = max(1, math.ceil(size / max(a.shape)))
    img = np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)
    return _png(img)


def _load_npz(folder: _Folder, path: Path) -> dict[str, np.ndarray]:
    """The plain arrays of an ``.npz`` (never unpickled); ``{}`` for a broken file."""
    try:
        with folder.open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
            return {name: np.asarray(npz[name]) for name in npz.files}
    except (OSError, ValueError, EOFError):  # half-written, foreign or pickled: skip it
        return {}


def _frames_from_npz(folder: _Folder, directory: Path, run: Run) -> None:
    """Fill ``run.frames`` from ``step_<N>.npz`` files (one array per layer)."""
    for path in folder.entries(directory, "step_*.npz"):
        step = _step_of(path)
        if step is None or not path.is_file():
            continue
        for layer, a in _load_npz(folder, path).items():
            frame = _map_frame(a)
            if frame is not None:
                run.frames.setdefault(layer, []).append((step, frame))


def _read_file_run(folder: _Folder, directory: Path, name: str) -> Run:
    run = Run(name=name, source="files", path=directory)
    metrics_csv = directory / "metrics.csv"
    _touch(run, metrics_csv)
    with folder.open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if None in row:  # more fields than the header: rows glued together, skip
                continue
            try:
                step, value = int(row["step"]), float(row["value"])
            except (KeyError, TypeError, ValueError):
                continue
            _add(run.metrics, row.get("key") or "", step, value)
    _read_files(folder, directory, run)
    if directory != folder.root:  # Lightning's CSVLogger metrics.csv, one level up
        _read_lightning_csv(folder, directory.parent / "metrics.csv", run)
    return _sort(run)


def _read_files(folder: _Folder, directory: Path, run: Run) -> None:
    """Heatmaps (``heatmaps/``, else the raw maps of ``erf_maps/``) and ``alerts.jsonl``."""
    for layer_dir in folder.entries(directory / "heatmaps"):
        if not layer_dir.is_dir():
            continue
        layer = "" if layer_dir.name == "_root" else unquote(layer_dir.name)
        for png in folder.entries(layer_dir, "step_*.png"):
            png_step = _step_of(png)
            data = folder.read_png(png) if png_step is not None and png.is_file() else None
            if png_step is not None and data is not None:
                run.frames.setdefault(layer, []).append((png_step, data))
    for maps in ("erf_maps", "maps"):  # "maps": logs of erf-monitor before 0.2
        if not run.frames:
            _frames_from_npz(folder, directory / maps, run)
    alerts = directory / "alerts.jsonl"
    if folder.is_file(alerts):
        with folder.open(alerts) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    run.alerts.append((int(rec["step"]), str(rec["title"]), str(rec["text"])))
                except (ValueError, KeyError, TypeError):
                    continue


def _read_csv_logger_run(folder: _Folder, directory: Path, name: str) -> Run | None:
    """A Lightning ``CSVLogger``'s ``log_dir``: the ERF columns of its wide ``metrics.csv``
    (the other columns are training curves), the monitor's files in its ``erf/``."""
    run = Run(name=name, source="files", path=directory)
    _read_lightning_csv(folder, directory / "metrics.csv", run, erf=True)
    if not run.metrics:
        return None
    _touch(run, directory / "metrics.csv")
    _read_files(folder, directory / _CSV_SUBDIR, run)
    return _sort(run)


def _read_lightning_csv(folder: _Folder, path: Path, run: Run, *, erf: bool = False) -> None:
    """Training curves from a Lightning ``CSVLogger`` ``metrics.csv`` (wide format); with
    ``erf``, its ERF columns too (where the monitor logs through ``log_metrics``)."""
    if not folder.is_file(path):
        return
    with folder.open(path) as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "step" not in reader.fieldnames or "key" in reader.fieldnames:
            return
        for row in reader:
            try:
                step = int(float(row["step"]))
            except (TypeError, ValueError):
                continue
            for key, text in row.items():
                if key in ("step", "epoch") or not text or (key or "").endswith("probe_time_s"):
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue
                if _split_key(key or ""):
                    if erf:
                        _add(run.metrics, key, step, value)
                else:
                    run.other.setdefault(key, []).append((step, value))


def _event_files(folder: _Folder, directory: Path) -> list[Path]:
    return [p for p in folder.entries(directory, "*tfevents*") if p.is_file()]


def _accumulators(folder: _Folder, directory: Path) -> Iterator[Any]:
    """One loaded ``EventAccumulator`` per event file inside the folder (never the
    directory at once: it would read a symlinked event file too)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for path in _event_files(folder, directory):
        acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
        try:
            acc.Reload()
        except Exception:  # a corrupt or foreign file: skip it
            continue
        yield path, acc


def key_from_tag(tag: str) -> str:
    from erf_monitor.sinks import key_from_tag as logged_key

    return logged_key(tag)


def _read_other_scalars(folder: _Folder, directory: Path, run: Run) -> None:
    for _, acc in _accumulators(folder, directory):
        for tag in acc.Tags().get("scalars", []):
            if (
                _split_key(key_from_tag(tag)) is None
                and not tag.endswith("probe_time_s")
                and tag != "epoch"
            ):
                run.other.setdefault(tag, []).extend(
                    (int(ev.step), float(ev.value)) for ev in acc.Scalars(tag)
                )


def _read_tensorboard_run(folder: _Folder, directory: Path, name: str) -> Run | None:
    run = Run(name=name, source="tensorboard", path=directory)
    for path, acc in _accumulators(folder, directory):
        _touch(run, path)
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            events = acc.Scalars(tag)
            key = key_from_tag(tag)  # the monitor's tags put the metric first
            if _split_key(key) is not None:
                for ev in events:
                    _add(run.metrics, key, int(ev.step), float(ev.value))
            elif not tag.endswith("probe_time_s") and tag != "epoch":
                run.other.setdefault(tag, []).extend(
                    (int(ev.step), float(ev.value)) for ev in events
                )
        for tag in tags.get("images", []):
            parts = key_from_tag(tag).split("/")
            if len(parts) >= 3 and parts[-1] == "heatmap":
                layer = "/".join(parts[1:-1])
                for img in acc.Images(tag):
                    run.frames.setdefault(layer, []).append(
                        (int(img.step), bytes(img.encoded_image_string))
                    )
        for tag in tags.get("tensors", []):
            if not tag.startswith("alerts/"):
                continue
            title = tag.removeprefix("alerts/").removesuffix("/text_summary")
            for ev in acc.Tensors(tag):
                values = ev.tensor_proto.string_val
                text = values[0].decode("utf-8", "replace") if values else ""
                run.alerts.append((int(ev.step), title, text))
    if not run.metrics:
        return None
    if not run.frames:
        _frames_from_npz(folder, directory / "erf_maps", run)
    if directory.name == _TB_SUBDIR and directory != folder.root:
        _read_other_scalars(folder, directory.parent, run)  # the Trainer's own curves
    return _sort(run)


def _read_analyze_run(folder: _Folder, directory: Path, name: str) -> Run | None:
    """An ``erf-monitor analyze --out`` folder: one probe, shown at step 0."""
    path = directory / "metrics.json"
    try:
        with folder.open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    layers = record.get("layers") if isinstance(record, dict) else None
    if not isinstance(layers, dict):
        return None
    run = Run(name=name, source="analyze", path=directory)
    _touch(run, path)
    for layer, rec in layers.items():
        values = rec.get("metrics") if isinstance(rec, dict) else None
        if not isinstance(values, dict):
            continue
        for metric, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                _add(run.metrics, f"erf/{layer}/{metric}", 0, float(value))
            elif value is None:
                _add(run.metrics, f"erf/{layer}/{metric}", 0, math.nan)
    from erf_monitor.sinks import safe_filename

    for layer in run.metrics:
        png = directory / "heatmaps" / f"{safe_filename(layer)}.png"
        data = folder.read_png(png) if folder.is_file(png) else None
        if data is not None:
            run.frames.setdefault(layer, []).append((0, data))
        png = directory / "fields" / f"{safe_filename(layer)}.png"
        data = folder.read_png(png) if folder.is_file(png) else None
        if data is not None:
            run.fields[layer] = data
    if not run.frames and folder.is_file(directory / "maps.npz"):
        for layer, a in _load_npz(folder, directory / "maps.npz").items():
            frame = _map_frame(a)
            if frame is not None:
                run.frames.setdefault(layer, []).append((0, frame))
    return _sort(run) if run.metrics else None


def _is_file_sink(folder: _Folder, directory: Path) -> bool:
    path = directory / "metrics.csv"
    if not folder.is_file(path):
        return False
    with folder.open(path) as f:
        return f.readline().strip() == "step,key,value"


def _natural(name: str) -> list[Any]:
    """Sort key: ``version_2`` before ``version_10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def find_runs(logdir: str | PathLike[str]) -> list[Run]:
    """Every run with ERF data under ``logdir`` (FileSink directories, TensorBoard runs and
    ``analyze`` outputs), reading nothing outside ``logdir`` (see the module docstring).

    Args:
        logdir: directory to search recursively (hidden directories are skipped; symbolic
            links are never followed out of it).

    Returns:
        The runs, in natural order of their names.

    Raises:
        ReportError: if ``logdir`` is not a directory.
    """
    root = Path(logdir)
    if not root.is_dir():
        raise ReportError(f"log directory {str(root)!r} does not exist")
    folder = _Folder(root)
    runs: list[Run] = []
    for current, dirs, files in os.walk(root):  # never descends into symlinked directories
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        directory = Path(current)
        if not folder.inside(directory):
            continue
        rel = directory.relative_to(root).as_posix()
        label = root.resolve().name if rel == "." else rel
        if "metrics.csv" in files and _is_file_sink(folder, directory):
            runs.append(_read_file_run(folder, directory, label))
        elif "metrics.csv" in files:
            csv_run = _read_csv_logger_run(folder, directory, label)
            if csv_run is not None:
                runs.append(csv_run)
        if any("tfevents" in f for f in files):
            tb_label = label
            if directory.name == _TB_SUBDIR and directory != root:
                parent = directory.parent.relative_to(root).as_posix()
                tb_label = root.resolve().name if parent == "." else parent
            tb = _read_tensorboard_run(folder, directory, tb_label)
            if tb is not None:
                runs.append(tb)
        if "metrics.json" in files:
            analyzed = _read_analyze_run(folder, directory, label)
            if analyzed is not None:
                runs.append(analyzed)
    return sorted(runs, key=lambda r: (_natural(r.name), r.source))


def _signature(run: Run) -> tuple[Any, ...]:
    """The run's ERF data, rounded to float32 precision (TensorBoard stores float32)."""
    return tuple(
        (layer, metric, tuple((s, f"{v:.5g}") for s, v in series))
        for layer, metrics in sorted(run.metrics.items())
        for metric, series in sorted(metrics.items())
    )


def dedupe_runs(runs: Iterable[Run]) -> list[Run]:
    """Runs with identical ERF data shown once: the newest is kept, with the others' names
    in its ``duplicates`` (a rerun with the same seed, one fit logged by two loggers)."""
    groups: dict[tuple[Any, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(_signature(run), []).append(run)
    kept = []
    for group in groups.values():
        group.sort(key=lambda r: r.mtime, reverse=True)
        keep = group[0]
        keep.duplicates = [f"{r.name} ({r.source})" for r in group[1:]]
        kept.append(keep)
    return sorted(kept, key=lambda r: (_natural(r.name), r.source))


# ---------------------------------------------------------------------------------- figures
def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _mpl_text(text: str) -> str:
    return text.replace("$", r"\$") or "<model>"


def _derived(metrics: dict[str, Series], metric: str) -> Series:
    """A stored series, or one computed from per-axis series (``centroid_offset``, ``sigma``)."""
    if metric in metrics:
        return metrics[metric]
    axes = sorted(k for k in metrics if k.startswith(metric + "_"))
    if not axes:
        return []
    by_step: dict[int, list[float]] = {}
    for key in axes:
        for step, value in metrics[key]:
            by_step.setdefault(step, []).append(value)
    if metric == "centroid_offset":  # distance from the theoretical centre
        return [(s, math.hypot(*v)) for s, v in sorted(by_step.items()) if len(v) == len(axes)]
    return [(s, sum(v) / len(v)) for s, v in sorted(by_step.items()) if len(v) == len(axes)]


#: Second row of the growth figure: how the shape of the ERF changes inside its square.
_SHAPE_CURVES = (
    ("area_t50", "area holding 50% of the mass, a(0.5)"),
    ("centroid_offset", "centroid offset from centre (px)"),
    ("sigma", "Gaussian width sigma (px, mean of axes)"),
)


#: Per curve: other hollow markers, and lines and markers thinner and smaller than the
#: curves drawn before, so that a curve drawn over an identical one leaves it visible as a
#: border (dashes stay for thresholds, dots for the reference line).
_MARKERS = ("o", "s", "^", "D", "v", "P")


def _plot_series(ax: Any, series: Series, color: str, label: str, index: int = 0) -> None:
    series = [(s, v) for s, v in series if math.isfinite(v)]
    if series:
        steps, values = zip(*series)
        k = index % 4
        ax.plot(steps, values, color=color, label=label, lw=3.2 - 0.7 * k,
                marker=_MARKERS[index % len(_MARKERS)], ms=8.5 - 1.5 * k, mfc="none",
                mew=1.2)  # fmt: skip


def _same_as(curves: dict[str, Any]) -> dict[str, str]:
    """``{name: earlier name}`` for curves equal to an earlier one (said in the legend)."""
    seen: dict[Any, str] = {}
    same = {}
    for name, curve in curves.items():
        key = repr(curve)
        if key in seen:
            same[name] = seen[key]
        else:
            seen[key] = name
    return same


def _reference_line(ax: Any, reference: float | None) -> None:
    if reference is not None:
        ax.axhline(
            reference,
            color="0.55",
            ls=":",
            lw=1.2,
            label=f"reference {reference:.0%} (no min_coverage logged)",
        )


def _style(ax: Any, metric: str, label: str) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.set_title(label, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if metric in ("coverage", "area_t50"):
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylim(bottom=0)


def _figure_legend(fig: Any, axes: Iterable[Any], title: str) -> None:
    handles: list[Any] = []
    labels: list[str] = []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, title=title)


def growth_figure(run: Run, reference: float | None = None) -> bytes:
    """PNG: ERF size, ERF/TRF ratio and coverage over steps, one line per layer; below them
    the 50%-mass area, centroid offset and sigma (the ERF can change shape or move while its
    95%-mass square stays the same). Coverage shows each layer's threshold (dashed), or the
    grey ``reference`` line when no layer has one."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13.5, 7.0), layout="constrained")
    axes = fig.subplots(2, 3)
    thresholds = run.thresholds()
    same = _same_as(run.metrics)
    for ax, (metric, label) in zip(axes.flat, _CURVES + _SHAPE_CURVES):
        for i, (layer, metrics) in enumerate(run.metrics.items()):
            color = f"C{i % 10}"
            name = _mpl_text(layer)
            if layer in same:
                name += f" (same as {_mpl_text(same[layer])})"
            _plot_series(ax, _derived(metrics, metric), color, name, i)
            if metric == "coverage" and layer in thresholds:
                ax.axhline(thresholds[layer], color=color, ls="--", lw=1)
        if metric == "coverage" and not thresholds:
            _reference_line(ax, reference)
        _style(ax, metric, label)
    _figure_legend(fig, axes.flat, "layer (dashed: min_coverage)" if thresholds else "layer")
    return _figure_png(fig)


def layers_figure(run: Run, reference: float | None = None) -> bytes:
    """PNG for a run of one probe (an ``analyze`` folder): ERF size, ERF/TRF ratio and
    coverage against the layers, in the run's order (deeper to the right), instead of growth
    curves of one point each."""
    return _figure_png(_layers_figure(run, reference))


def _layers_figure(run: Run, reference: float | None) -> Any:
    from matplotlib.figure import Figure

    layers = list(run.metrics)
    fig = Figure(figsize=(13.5, 3.9), layout="constrained")
    axes = fig.subplots(1, 3)
    thresholds = run.thresholds()
    for ax, (metric, label) in zip(axes, _CURVES):
        points = [(i, _derived(run.metrics[layer], metric)) for i, layer in enumerate(layers)]
        xs = [i for i, s in points if s and math.isfinite(s[-1][1])]
        ax.plot(xs, [points[i][1][-1][1] for i in xs], marker="o", ms=5, lw=1.2, color="C0")
        if metric == "coverage":
            checked = [i for i, layer in enumerate(layers) if layer in thresholds]
            if checked:
                ax.plot(checked, [thresholds[layers[i]] for i in checked], ls="", marker="_",
                        ms=18, mew=2, color="C3", label="min_coverage")  # fmt: skip
            else:
                _reference_line(ax, reference)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="lower right")
        _style(ax, metric, label)
        ax.set_xlabel("layer")
        ax.set_xticks(range(len(layers)), [_mpl_text(n) for n in layers], rotation=30, ha="right")
        ax.set_xlim(-0.5, len(layers) - 0.5)
    return fig


def comparison_figure(layer: str, runs: list[Run], reference: float | None = None) -> bytes:
    """PNG: one layer's ERF size, coverage and ERF/TRF ratio over steps, one line per run
    (when every run has one probe, e.g. ``analyze`` outputs, one point per run, side by
    side); coverage shows each run's threshold for the layer (dashed, the run's colour) or
    the grey reference."""
    return _figure_png(_comparison_figure(layer, runs, reference))


def _comparison_figure(layer: str, runs: list[Run], reference: float | None) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13.5, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    curves = (_CURVES[0], _CURVES[2], _CURVES[1])
    any_threshold = False
    # a reference line only when no run checks any layer (else this layer is just unchecked)
    reference = None if any(r.thresholds() for r in runs) else reference
    # runs of one probe each (analyze folders): one point per run, side by side on the x-axis
    by_run = all(r.single_probe() for r in runs)
    same = {} if by_run else _same_as({r.name: r.metrics[layer] for r in runs})
    for ax, (metric, label) in zip(axes, curves):
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            series = _derived(run.metrics[layer], metric)
            if by_run:
                series = [(i, v) for _, v in series]
            name = _mpl_text(run.name)
            if run.name in same:
                name += f" (same as {_mpl_text(same[run.name])})"
            _plot_series(ax, series, color, name, i)
            threshold = run.thresholds().get(layer)
            if metric == "coverage" and threshold is not None:
                any_threshold = True
                ax.axhline(threshold, color=color, ls="--", lw=1)
        if metric == "coverage" and not any_threshold:
            _reference_line(ax, reference)
        _style(ax, metric, label)
        if by_run:
            ax.set_xlabel("run")
            ax.set_xticks(range(len(runs)), [_mpl_text(r.name) for r in runs], rotation=30,
                          ha="right")  # fmt: skip
            ax.set_xlim(-0.5, len(runs) - 0.5)
    fig.suptitle(f"layer {_mpl_text(layer)}", fontsize=11)
    _figure_legend(fig, axes, "run (dashed: min_coverage)" if any_threshold else "run")
    return fig


def other_figure(run: Run, max_keys: int = 4) -> bytes | None:
    """PNG of the run's other scalars (training loss, accuracy...), or ``None``."""
    keys = [k for k in sorted(run.other) if len(run.other[k]) > 1][:max_keys]
    if not keys:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.4 * len(keys), 2.8), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        steps, values = zip(*run.other[key])
        ax.plot(steps, values, lw=1.2, color="0.25")
        ax.set_title(_mpl_text(key), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _figure_png(fig)


def _pick(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n - 1]


# ---------------------------------------------------------------------------------- HTML
@functools.cache
def _templates() -> jinja2.Environment:
    """The report's templates (``cli/templates/``); every value they print is escaped."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("erf_monitor.cli", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = _fmt
    env.filters["first_last"] = _first_last
    return env


def _fmt(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or ``–`` for no value."""
    return "–" if value is None else format(value, spec)


def _first_last(values: list[float], spec: str) -> str:
    """``first → last`` of a series' values (the one value, or ``–`` for none)."""
    if not values:
        return "–"

    def f(v: float) -> str:
        return "n/a" if not math.isfinite(v) else format(v, spec)

    return f(values[-1]) if len(values) == 1 else f"{f(values[0])} → {f(values[-1])}"


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _last(series: Series) -> float | None:
    return series[-1][1] if series else None


_SOURCES = {
    "tensorboard": "TensorBoard event files",
    "files": "FileSink files",
    "analyze": "erf-monitor analyze output",
}


def _run_view(run: Run, index: int, max_frames: int, reference: float | None) -> dict[str, Any]:
    """What ``run.html.j2`` shows of one run: plain values, figures as base64 PNG."""
    thresholds = run.thresholds()
    alerted = {title.removeprefix("erf_coverage/"): step for step, title, _ in run.alerts}
    rows = []
    for layer, metrics in run.metrics.items():
        rows.append(
            {
                "layer": layer,
                "trf": _last(metrics.get("trf_size_clipped", [])),
                "trf_global": (_last(metrics.get("trf_global", [])) or 0) > 0,
                "trf_data_dependent": (_last(metrics.get("trf_data_dependent", [])) or 0) > 0,
                **{
                    metric: [v for _, v in metrics.get(metric, [])]
                    for metric in ("erf_size", "erf_trf_ratio", "coverage")
                },
                "threshold": thresholds.get(layer),
                "alerted": alerted.get(layer),
            }
        )
    single = run.single_probe()
    plot = layers_figure(run, reference) if single else growth_figure(run, reference)
    curves = other_figure(run)
    frames = []
    for layer, series in run.frames.items():
        shown = [series[i] for i in _pick(len(series), max_frames)]
        frames.append(
            {
                "layer": layer,
                "total": len(series),
                "shown": [{"step": step, "png": _b64(png)} for step, png in shown],
            }
        )
    return {
        "index": index,
        "name": run.name,
        "source": run.source,
        "source_label": _SOURCES.get(run.source, run.source),
        "path": str(run.path),
        "duplicates": run.duplicates,
        "steps": sorted({s for m in run.metrics.values() for sr in m.values() for s, _ in sr}),
        "alerts": [{"step": s, "title": title, "text": text} for s, title, text in run.alerts],
        "rows": rows,
        "checked": bool(thresholds),
        "single_probe": single,
        "plot": _b64(plot),
        "training_curves": None if curves is None else _b64(curves),
        "frames": frames,
        "fields": [{"layer": layer, "png": _b64(png)} for layer, png in run.fields.items()],
    }


def _shared_layers(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """Layers that several runs report, in order of first appearance, with those runs."""
    order: dict[str, list[Run]] = {}
    for run in runs:
        for layer in run.metrics:
            order.setdefault(layer, []).append(run)
    shared = [(layer, rs) for layer, rs in order.items() if len(rs) > 1]
    # checked layers (those with a threshold in some run) first: they are what the runs are
    # judged by; then the others in order of appearance
    return sorted(shared, key=lambda item: not any(item[0] in r.thresholds() for r in item[1]))


def _compare_view(runs: list[Run], reference: float | None) -> list[dict[str, Any]]:
    """What ``compare.html.j2`` shows: per shared layer, the plot and each run's last heatmap."""
    out = []
    for layer, rs in _shared_layers(runs):
        last = [(run.name, run.frames[layer][-1]) for run in rs if run.frames.get(layer)]
        out.append(
            {
                "layer": layer,
                "plot": _b64(comparison_figure(layer, rs, reference)),
                "strip": [{"run": n, "step": s, "png": _b64(png)} for n, (s, png) in last],
            }
        )
    return out


def render_html(
    runs: Iterable[Run],
    *,
    title: str,
    source: str,
    max_frames: int = 8,
    reference: float | None = None,
) -> str:
    """The report page (a complete, self-contained HTML document)."""
    from erf_monitor import __version__

    runs = list(runs)
    page = _templates().get_template("report.html.j2")
    return page.render(
        title=title,
        source=source,
        now=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        version=__version__,
        reference=reference,
        compare=_compare_view(runs, reference),
        runs=[_run_view(run, i, max_frames, reference) for i, run in enumerate(runs)],
    )


def build_report(
    logdir: str | PathLike[str],
    out: str | PathLike[str] | None = None,
    *,
    max_frames: int = 8,
    title: str | None = None,
    reference_coverage: float | None = None,
    dedupe: bool = True,
) -> tuple[Path, list[Run]]:
    """Find the runs under ``logdir`` and write the HTML report.

    Args:
        logdir: directory with FileSink output, TensorBoard event files and/or
            ``erf-monitor analyze`` outputs.
        out: HTML file to write (default ``<logdir>/erf_report.html``).
        max_frames: heatmaps per filmstrip (evenly spaced over the probed steps).
        title: page title (default: "ERF report: <logdir name>").
        reference_coverage: threshold line drawn on coverage plots of runs that logged none
            (default: the library's default ``min_coverage``, 5%).
        dedupe: show runs with identical ERF data once.

    Returns:
        The path written and the runs it shows.

    Raises:
        ReportError: if ``logdir`` does not exist or holds no ERF data.
    """
    if max_frames < 1:
        raise ReportError(f"--frames must be >= 1, got {max_frames}")
    if reference_coverage is None:
        from erf_monitor.monitor.options import DEFAULT_MIN_COVERAGE

        reference_coverage = DEFAULT_MIN_COVERAGE
    root = Path(logdir)
    runs = find_runs(root)
    if not runs:
        raise ReportError(
            f"no ERF data under {str(root)!r}: expected FileSink output (metrics.csv with "
            "step,key,value), TensorBoard event files with erf/<layer>/... scalars, or an "
            "erf-monitor analyze folder (metrics.json)"
        )
    if dedupe:
        runs = dedupe_runs(runs)
    path = Path(out) if out is not None else root / "erf_report.html"
    page = render_html(
        runs,
        title=title or f"ERF report: {root.resolve().name}",
        source=str(root),
        max_frames=max_frames,
        reference=reference_coverage,
    )
    from erf_monitor.core.files import replaced

    with replaced(path) as tmp:  # never through a link planted at ``path``; never half a page
        tmp.write_text(page, encoding="utf-8")
    return path, runs
