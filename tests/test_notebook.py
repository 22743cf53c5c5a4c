"""Results in Jupyter: ``_repr_html_`` / ``_repr_png_`` / ``plot()``, and the example notebook
executed by a real kernel (nbclient + ipykernel)."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import sys
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from nbclient import NotebookClient
from PIL import Image
from torch import nn

import erf_monitor as em
from erf_monitor.viz.render import render_heatmap

ROOT = Path(__file__).resolve().parents[1]


# -- independent references -------------------------------------------------------------------
def box_stack_map(n: int, k: int, size: int) -> np.ndarray:
    """The Luo map of the centre unit of ``n`` all-ones ``k x k`` convolutions (zero padding,
    one channel): the n-fold convolution of a ``k``-box with itself, per axis, placed around the
    centre pixel (DESIGN §2: the map of such a stack is separable)."""
    profile = np.ones(1)
    for _ in range(n):
        profile = np.convolve(profile, np.ones(k))
    line = np.zeros(size)
    c, half = size // 2, (len(profile) - 1) // 2
    line[c - half : c + half + 1] = profile
    return np.outer(line, line)


def reference_extent(a: np.ndarray, t: float, centre: tuple[int, int]) -> tuple[int, float]:
    """``(m(t), a(t))`` by the definition: the first centred square of odd side ``2i + 1``
    (clipped to the map) holding strictly more than ``t`` of the mass, and its clipped area
    over the map's."""
    h, w = a.shape
    total = a.sum()
    cy, cx = centre
    i = 0
    while True:
        y0, y1, x0, x1 = max(cy - i, 0), min(cy + i, h - 1), max(cx - i, 0), min(cx + i, w - 1)
        if a[y0 : y1 + 1, x0 : x1 + 1].sum() > t * total:
            return 2 * i + 1, (y1 - y0 + 1) * (x1 - x0 + 1) / (h * w)
        i += 1


def box_stack(n: int, k: int) -> nn.Sequential:
    convs = []
    for _ in range(n):
        conv = nn.Conv2d(1, 1, k, padding=k // 2, bias=False)
        nn.init.ones_(conv.weight)
        convs.append(conv)
    return nn.Sequential(*convs)


class _Tables(HTMLParser):
    """Every ``<table>``'s rows of cell texts, and every inline PNG."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[bytes] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            src = dict(attrs)["src"] or ""
            assert src.startswith("data:image/png;base64,")
            self.images.append(base64.b64decode(src.split(",", 1)[1]))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(html: str) -> _Tables:
    p = _Tables()
    p.feed(html)
    return p


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# -- display of one result ------------------------------------------------------------------
N, K, SIZE = 3, 5, 33


@pytest.fixture(scope="module")
def stack_results() -> em.ERFResults:
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return em.compute_erf(box_stack(N, K), x, ["0", "1", "2"])


def test_result_html_shows_its_heatmap_and_metrics(stack_results: em.ERFResults) -> None:
    r = stack_results["2"]
    shown = parse(r._repr_html_())
    (png,) = shown.images
    np.testing.assert_array_equal(pixels(png), render_heatmap(r))  # the logged picture
    rows = dict((row[0], row[1]) for row in shown.tables[0])
    expected = box_stack_map(N, K, SIZE)
    c = (SIZE // 2, SIZE // 2)
    m95, a95 = reference_extent(expected, 0.95, c)
    assert rows["layer"] == "2"
    assert rows["ERF size m(0.95) (px)"] == str(m95)
    assert rows["coverage a(0.95)"] == f"{100 * a95:.2f}%"
    for t in (0.2, 0.3, 0.5, 0.99):
        assert rows[f"a({t:.2f})"] == f"{100 * reference_extent(expected, t, c)[1]:.2f}%"
    trf = N * (K - 1) + 1  # DESIGN §2: n (k - 1) + 1
    assert rows["TRF (clipped, px)"] == f"{trf}×{trf}"
    assert rows["ERF/TRF"] == f"{m95 / trf:.3f}"
    sigma = math.sqrt(N * (K**2 - 1) / 12)  # per-axis variance n (k^2 - 1) / 12
    assert rows["sigma (px)"] == f"{sigma:.2f}, {sigma:.2f}"
    assert rows["probe images"] == "2" and rows["mode"] == "luo"


def test_result_png_is_its_annotated_heatmap(stack_results: em.ERFResults) -> None:
    r = stack_results["1"]
    png = r._repr_png_()
    assert png is not None and png.startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(pixels(png), render_heatmap(r))


def test_results_html_has_every_layer(stack_results: em.ERFResults) -> None:
    shown = parse(stack_results._repr_html_())
    assert len(shown.images) == 3
    for png, r in zip(shown.images, stack_results.values()):
        np.testing.assert_array_equal(pixels(png), render_heatmap(r, min_size=200))
    header, *rows = shown.tables[0]
    assert header[:4] == ["layer", "output", "TRF (px)", "ERF (px)"]
    assert [row[0] for row in rows] == ["0", "1", "2"]
    c = (SIZE // 2, SIZE // 2)
    for n, row in enumerate(rows, start=1):
        cells = dict(zip(header, row))
        expected = box_stack_map(n, K, SIZE)
        assert cells["ERF (px)"] == str(reference_extent(expected, 0.95, c)[0])
        for t in (0.2, 0.3, 0.5, 0.99):
            want = 100 * reference_extent(expected, t, c)[1]
            assert cells[f"a({round(t * 100)}%)"] == f"{want:.2f}%"


def test_field_displays_its_figure_and_every_position() -> None:
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    field = em.compute_erf(box_stack(2, 3), x, ["1"], position="corners")["1"].field
    assert field is not None
    png = field._repr_png_()
    assert png is not None and pixels(png).shape[2] == 3
    shown = parse(field._repr_html_())
    assert len(shown.images) == 1
    header, *rows = shown.tables[0]
    assert [row[0] for row in rows] == list(field)
    # a corner unit of two 3x3 all-ones convolutions (zero padding) sees a 3x3 corner of the
    # 5x5 pyramid: its map is the clipped pyramid, measured around the corner pixel
    corner = dict(zip(header, rows[1]))
    full = box_stack_map(2, 3, 2 * SIZE + 1)
    clipped = full[SIZE:, SIZE:][:SIZE, :SIZE]  # the corner pixel at (0, 0)
    assert corner["ERF (px)"] == str(reference_extent(clipped, 0.95, (0, 0))[0])
    assert isinstance(field.plot(), Figure)


def test_names_are_escaped() -> None:
    model = nn.Sequential()
    model.add_module("<img src=x onerror=alert(1)>", nn.Conv2d(1, 1, 3))
    x = torch.randn(1, 1, 9, 9)
    res = em.compute_erf(model, x, ["<img src=x onerror=alert(1)>"])
    for html in (res._repr_html_(), next(iter(res.values()))._repr_html_()):
        assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


def test_plot_returns_figures(stack_results: em.ERFResults) -> None:
    fig = stack_results.plot(ncols=3, log_scale=True)
    assert isinstance(fig, Figure) and len([a for a in fig.axes if a.images]) == 3
    one = stack_results["2"].plot()
    assert isinstance(one, Figure) and "2" in one.axes[0].get_title()


# -- the example notebook, run by a real kernel --------------------------------------------
@pytest.mark.slow
def test_example_notebook_runs_in_a_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernels = tmp_path / "jupyter" / "kernels" / "erf-monitor-test"
    kernels.mkdir(parents=True)
    src = str(ROOT / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "erf-monitor test",
        "language": "python",
        "env": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
    }
    (kernels / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    nb = nbformat.read(ROOT / "examples" / "erf_notebook.ipynb", as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="erf-monitor-test",
        timeout=None,  # no per-cell time limit: a busy machine is slow, not wrong
        startup_timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on any error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    rich = [o for o in outputs if o.output_type in ("execute_result", "display_data")]
    htmls = [o.data["text/html"] for o in rich if "text/html" in o.data]
    pngs = [o.data["image/png"] for o in rich if "image/png" in o.data]
    # results, one result and the field as HTML (images inline, tables); the two figures as PNG
    assert len(htmls) == 3 and all("<table" in h and "data:image/png;base64," in h for h in htmls)
    assert len(pngs) >= 2 + 2  # a result and a field also offer PNG; two figures
    for png in pngs:
        assert base64.b64decode(png).startswith(b"\x89PNG")
    assert (tmp_path / "erf_plain.pdf").read_bytes().startswith(b"%PDF-")
    assert b"<svg" in (tmp_path / "erf_grid.svg").read_bytes()
