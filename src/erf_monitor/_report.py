"""``erf-monitor report``: one self-contained HTML page from what the sinks wrote.

Sources, found anywhere under the log directory:

* **FileSink directories** (also ``<CSVLogger log_dir>/erf``): ``metrics.csv`` in long format
  ``step,key,value``, ``heatmaps/<layer>/step_<N>.png``, ``maps/step_<N>.npz`` and
  ``alerts.jsonl``; Lightning's own wide ``metrics.csv`` one level up adds training curves.
* **TensorBoard runs**: event files read with ``EventAccumulator`` (scalars
  ``<prefix>/<layer>/<metric>``, images ``<prefix>/<layer>/heatmap``, alert texts), plus
  ``erf_maps/step_<N>.npz`` when the event files hold no images.

Everything read is data: ``.npz`` files are loaded with ``allow_pickle=False``, PNGs are
copied as bytes, and every name (layers, runs, alert texts) is escaped with ``html.escape``.
Images are inlined as base64 PNG; the page needs no other file and no network.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

__all__ = ["ReportError", "Run", "build_report", "find_runs", "render_html"]

#: Metric names of ``ERFResult.scalars()``; a scalar key ``<prefix>/<layer>/<metric>`` whose
#: last part is one of these (or matches the per-axis/area patterns) is an ERF metric.
_METRICS = {
    "coverage", "erf_size", "erf_trf_ratio", "trf_size", "trf_size_clipped", "trf_global",
    "trf_data_dependent",
}  # fmt: skip
_METRIC_PATTERN = re.compile(
    r"^(area_t\d+|sigma_\w+|centroid_offset_\w+|gaussian_r2|gridding_period_\w+|coverage_trf"
    r"|erf_size_visible|anisotropy|axis_angle|cross_score|dead_fraction|border_ratio)$"
)
#: The three growth curves, with their axis labels.
_CURVES = (
    ("erf_size", "ERF size (95%-mass square, px)"),
    ("erf_trf_ratio", "ERF / TRF (clipped)"),
    ("coverage", "coverage (fraction of input)"),
)
_THRESHOLD = re.compile(r"min_coverage=([0-9.]+)%")


class ReportError(Exception):
    """Nothing to report (no log directory, or no ERF data in it)."""


Series = list[tuple[int, float]]


@dataclass
class Run:
    """Everything the report shows for one run."""

    name: str
    source: str  # "files" or "tensorboard"
    path: Path
    #: ``{layer: {metric: [(step, value), ...]}}`` sorted by step.
    metrics: dict[str, dict[str, Series]] = field(default_factory=dict)
    #: ``{layer: [(step, png_bytes), ...]}`` sorted by step.
    frames: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    #: ``[(step, title, text)]``.
    alerts: list[tuple[int, str, str]] = field(default_factory=list)
    #: Other scalars (training loss, accuracy...): ``{key: [(step, value)]}``.
    other: dict[str, Series] = field(default_factory=dict)


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
    run.alerts.sort(key=lambda a: a[0])
    return run


_STEP_FILE = re.compile(r"^step_(\d+)\.(png|npz)$")


def _step_of(path: Path) -> int | None:
    m = _STEP_FILE.match(path.name)
    return int(m.group(1)) if m else None


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
    from erf_monitor._render import colorize

    if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
        return None
    img = colorize(a)
    factor = max(1, math.ceil(size / max(a.shape)))
    img = np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)
    return _png(img)


def _frames_from_npz(folder: Path, run: Run) -> None:
    """Fill ``run.frames`` from ``step_<N>.npz`` files (one array per layer)."""
    for path in sorted(folder.glob("step_*.npz")):
        step = _step_of(path)
        if step is None:
            continue
        try:
            with np.load(path, allow_pickle=False) as npz:
                for layer in npz.files:
                    frame = _map_frame(np.asarray(npz[layer]))
                    if frame is not None:
                        run.frames.setdefault(layer, []).append((step, frame))
        except (OSError, ValueError):  # a half-written or foreign file: skip it
            continue


def _read_file_run(directory: Path, name: str) -> Run:
    run = Run(name=name, source="files", path=directory)
    with (directory / "metrics.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                step, value = int(row["step"]), float(row["value"])
            except (KeyError, TypeError, ValueError):
                continue
            _add(run.metrics, row.get("key") or "", step, value)
    heatmaps = directory / "heatmaps"
    if heatmaps.is_dir():
        for folder in sorted(p for p in heatmaps.iterdir() if p.is_dir()):
            layer = "" if folder.name == "_root" else unquote(folder.name)
            for png in folder.glob("step_*.png"):
                png_step = _step_of(png)
                if png_step is not None:
                    run.frames.setdefault(layer, []).append((png_step, png.read_bytes()))
    if not run.frames and (directory / "maps").is_dir():
        _frames_from_npz(directory / "maps", run)
    alerts = directory / "alerts.jsonl"
    if alerts.is_file():
        for line in alerts.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                run.alerts.append((int(rec["step"]), str(rec["title"]), str(rec["text"])))
            except (ValueError, KeyError, TypeError):
                continue
    _read_lightning_csv(directory.parent / "metrics.csv", run)
    return _sort(run)


def _read_lightning_csv(path: Path, run: Run) -> None:
    """Training curves from a Lightning ``CSVLogger`` ``metrics.csv`` (wide format)."""
    if not path.is_file():
        return
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "step" not in reader.fieldnames or "key" in reader.fieldnames:
            return
        for row in reader:
            try:
                step = int(float(row["step"]))
            except (TypeError, ValueError):
                continue
            for key, text in row.items():
                if key in ("step", "epoch") or not text or _split_key(key or ""):
                    continue
                try:
                    run.other.setdefault(key, []).append((step, float(text)))
                except ValueError:
                    continue


def _read_tensorboard_run(directory: Path, name: str) -> Run | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    run = Run(name=name, source="tensorboard", path=directory)
    for tag in tags.get("scalars", []):
        events = acc.Scalars(tag)
        if _split_key(tag) is not None:
            for ev in events:
                _add(run.metrics, tag, int(ev.step), float(ev.value))
        elif not tag.endswith("probe_time_s") and tag != "epoch":
            run.other[tag] = [(int(ev.step), float(ev.value)) for ev in events]
    if not run.metrics:
        return None
    for tag in tags.get("images", []):
        parts = tag.split("/")
        if len(parts) >= 3 and parts[-1] == "heatmap":
            layer = "/".join(parts[1:-1])
            for img in acc.Images(tag):
                run.frames.setdefault(layer, []).append(
                    (int(img.step), bytes(img.encoded_image_string))
                )
    if not run.frames and (directory / "erf_maps").is_dir():
        _frames_from_npz(directory / "erf_maps", run)
    for tag in tags.get("tensors", []):
        if not tag.startswith("alerts/"):
            continue
        title = tag.removeprefix("alerts/").removesuffix("/text_summary")
        for ev in acc.Tensors(tag):
            values = ev.tensor_proto.string_val
            text = values[0].decode("utf-8", "replace") if values else ""
            run.alerts.append((int(ev.step), title, text))
    return _sort(run)


def _is_file_sink(directory: Path) -> bool:
    path = directory / "metrics.csv"
    if not path.is_file():
        return False
    with path.open(encoding="utf-8") as f:
        return f.readline().strip() == "step,key,value"


def find_runs(logdir: str | PathLike[str]) -> list[Run]:
    """Every run with ERF data under ``logdir`` (FileSink directories and TensorBoard runs).

    Args:
        logdir: directory to search recursively (hidden directories are skipped).

    Returns:
        The runs, sorted by name.

    Raises:
        ReportError: if ``logdir`` is not a directory.
    """
    root = Path(logdir)
    if not root.is_dir():
        raise ReportError(f"log directory {str(root)!r} does not exist")
    runs: list[Run] = []
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        directory = Path(current)
        rel = directory.relative_to(root).as_posix()
        label = root.resolve().name if rel == "." else rel
        if "metrics.csv" in files and _is_file_sink(directory):
            runs.append(_read_file_run(directory, label))
        if any(f.startswith("events.out.tfevents") for f in files):
            tb = _read_tensorboard_run(directory, label)
            if tb is not None:
                runs.append(tb)
    return sorted(runs, key=lambda r: (r.name, r.source))


# ---------------------------------------------------------------------------------- figures
def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _mpl_text(text: str) -> str:
    return text.replace("$", r"\$") or "<model>"


def _thresholds(run: Run) -> dict[str, float]:
    out: dict[str, float] = {}
    for _, title, text in run.alerts:
        m = _THRESHOLD.search(text)
        if m:
            out[title.removeprefix("erf_coverage/")] = float(m.group(1)) / 100.0
    return out


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


def growth_figure(run: Run) -> bytes:
    """PNG: ERF size, ERF/TRF ratio and coverage over steps, one line per layer; below them
    the 50%-mass area, centroid offset and sigma (the ERF can change shape or move while its
    95%-mass square stays the same)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    fig = Figure(figsize=(13.5, 7.0), layout="constrained")
    axes = fig.subplots(2, 3)
    thresholds = _thresholds(run)
    for ax, (metric, label) in zip(axes.flat, _CURVES + _SHAPE_CURVES):
        for i, (layer, metrics) in enumerate(run.metrics.items()):
            series = [(s, v) for s, v in _derived(metrics, metric) if math.isfinite(v)]
            if not series:
                continue
            steps, values = zip(*series)
            color = f"C{i % 10}"
            ax.plot(steps, values, marker="o", ms=3, lw=1.5, color=color, label=_mpl_text(layer))
            if metric == "coverage" and layer in thresholds:
                ax.axhline(thresholds[layer], color=color, ls="--", lw=1)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if metric in ("coverage", "area_t50"):
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            ax.set_ylim(bottom=0)
    handles: list[Any] = []
    labels: list[str] = []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        title = "layer (dashed: min_coverage)" if thresholds else "layer"
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, title=title)
    return _figure_png(fig)


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
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1400px;padding:0 1rem;color:#222}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.5rem}
.meta{color:#666;font-size:.9rem} code{background:#f3f3f3;padding:0 .25rem}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f6f6f6}
.bad{color:#b00020;font-weight:600} .ok{color:#1b7f3b}
.alert{background:#fff4e5;border-left:4px solid #f0a020;padding:.4rem .8rem;margin:.4rem 0;
font-size:.85rem;white-space:pre-wrap}
.strip{display:flex;gap:.4rem;overflow-x:auto;padding-bottom:.3rem}
.strip figure{margin:0;text-align:center;font-size:.75rem;color:#555}
.strip img{width:150px;height:auto;image-rendering:pixelated;display:block}
img.plot{max-width:100%}
.legend{font-size:.85rem;color:#444}
"""


def _img(data: bytes, alt: str, cls: str = "") -> str:
    b64 = base64.b64encode(data).decode("ascii")
    cls_attr = f' class="{cls}"' if cls else ""
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}"{cls_attr}>'


def _first_last(series: Series, fmt: str) -> str:
    if not series:
        return "–"
    first, last = series[0][1], series[-1][1]

    def f(v: float) -> str:
        return "n/a" if not math.isfinite(v) else format(v, fmt)

    return f(last) if len(series) == 1 else f"{f(first)} → {f(last)}"


def _run_section(run: Run, index: int, max_frames: int) -> str:
    e = html.escape
    out = [f'<section id="run-{index}">', f"<h2>{e(run.name)}</h2>"]
    where = "TensorBoard event files" if run.source == "tensorboard" else "FileSink files"
    out.append(f'<p class="meta">{where} in <code>{e(str(run.path))}</code></p>')
    alerted = {title.removeprefix("erf_coverage/"): step for step, title, _ in run.alerts}
    for step, title, text in run.alerts:
        out.append(f'<div class="alert"><b>step {step} · {e(title)}</b>\n{e(text)}</div>')
    out.append(
        "<table><tr><th>layer</th><th>probes</th><th>TRF (clipped)</th><th>ERF size (px)</th>"
        "<th>ERF/TRF</th><th>coverage</th><th>alert</th></tr>"
    )
    for layer, metrics in run.metrics.items():
        trf = metrics.get("trf_size_clipped", [])
        global_ = metrics.get("trf_global", [])
        dependent = metrics.get("trf_data_dependent", [])
        trf_text = "–" if not trf else f"{trf[-1][1]:.0f}"
        if dependent and dependent[-1][1] > 0:
            trf_text = "data-dependent"
        elif global_ and global_[-1][1] > 0:
            trf_text += " (global)"
        cov = metrics.get("coverage", [])
        alert = (
            f'<span class="bad">step {alerted[layer]}</span>'
            if layer in alerted
            else '<span class="ok">none</span>'
        )
        out.append(
            f"<tr><td>{e(layer or '<model>')}</td><td>{len(cov)}</td><td>{trf_text}</td>"
            f"<td>{_first_last(metrics.get('erf_size', []), '.0f')}</td>"
            f"<td>{_first_last(metrics.get('erf_trf_ratio', []), '.2f')}</td>"
            f"<td>{_first_last(cov, '.1%')}</td><td>{alert}</td></tr>"
        )
    out.append("</table>")
    out.append("<h3>Growth over training</h3>")
    out.append(_img(growth_figure(run), f"ERF growth curves of {run.name}", "plot"))
    other = other_figure(run)
    if other is not None:
        out.append("<h3>Training curves</h3>")
        out.append(_img(other, f"training curves of {run.name}", "plot"))
    if run.frames:
        out.append("<h3>Heatmaps over training</h3>")
        out.append(
            '<p class="legend">Each frame is the ERF map of the centre unit, normalised to its '
            "maximum. Cyan: theoretical receptive field clipped to the input; white: the square "
            "holding 95% of the ERF's mass.</p>"
        )
        for layer, frames in run.frames.items():
            out.append(f'<h4>{e(layer or "<model>")}</h4><div class="strip">')
            for i in _pick(len(frames), max_frames):
                step, data = frames[i]
                out.append(
                    f"<figure>{_img(data, f'{layer} step {step}')}"
                    f"<figcaption>step {step}</figcaption></figure>"
                )
            out.append("</div>")
    out.append("</section>")
    return "\n".join(out)


def render_html(runs: Iterable[Run], *, title: str, source: str, max_frames: int = 8) -> str:
    """The report page (a complete, self-contained HTML document)."""
    from erf_monitor import __version__

    runs = list(runs)
    e = html.escape
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">{len(runs)} run(s) from <code>{e(source)}</code> · generated {now} '
        f"by erf-monitor {e(__version__)}. Metrics are defined in the erf-monitor docs "
        "(concepts): ERF size = side of the centred square holding 95% of the ERF's mass; "
        "coverage = that square's share of the input area.</p>",
        "<ul>",
    ]
    for i, run in enumerate(runs):
        parts.append(
            f'<li><a href="#run-{i}">{e(run.name)}</a> ({e(run.source)}, '
            f"{len(run.metrics)} layer(s), {len(run.alerts)} alert(s))</li>"
        )
    parts.append("</ul>")
    parts.extend(_run_section(run, i, max_frames) for i, run in enumerate(runs))
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(
    logdir: str | PathLike[str],
    out: str | PathLike[str] | None = None,
    *,
    max_frames: int = 8,
    title: str | None = None,
) -> tuple[Path, list[Run]]:
    """Find the runs under ``logdir`` and write the HTML report.

    Args:
        logdir: directory with FileSink output and/or TensorBoard event files.
        out: HTML file to write (default ``<logdir>/erf_report.html``).
        max_frames: heatmaps per filmstrip (evenly spaced over the probed steps).
        title: page title (default: "ERF report: <logdir name>").

    Returns:
        The path written and the runs it shows.

    Raises:
        ReportError: if ``logdir`` does not exist or holds no ERF data.
    """
    if max_frames < 1:
        raise ReportError(f"--frames must be >= 1, got {max_frames}")
    root = Path(logdir)
    runs = find_runs(root)
    if not runs:
        raise ReportError(
            f"no ERF data under {str(root)!r}: expected FileSink output (metrics.csv with "
            "step,key,value) or TensorBoard event files with erf/<layer>/... scalars"
        )
    path = Path(out) if out is not None else root / "erf_report.html"
    page = render_html(
        runs,
        title=title or f"ERF report: {root.resolve().name}",
        source=str(root),
        max_frames=max_frames,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path, runs
