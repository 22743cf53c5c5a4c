"""The researcher's command line: ``analyze`` over several models (folders, combined table,
grid figure, ``--skip-existing``), ``--table md|latex`` (checked against maps derived in the
test), ``--format png|pdf|svg`` for ``analyze`` and ``compare``, and ``torchrun`` sharding the
probe images over 2 CPU processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import HANG_GUARD_S
from erf_monitor.cli import main
from erf_monitor.cli.tables import tex_number

ROOT = Path(__file__).resolve().parents[1]
SIZE, K = 33, 5

MODELS = """
import torch
from torch import nn


def stack(n):
    convs = []
    for _ in range(n):
        conv = nn.Conv2d(1, 1, 5, padding=2, bias=False)
        nn.init.ones_(conv.weight)
        convs.append(conv)
    return nn.Sequential(*convs)


def two():
    return stack(2)


def three():
    return stack(3)


def relu_net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),
    )
"""


@pytest.fixture
def models(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(textwrap.dedent(MODELS))
    return path


# -- independent references ----------------------------------------------------------------
def box_stack_map(n: int) -> np.ndarray:
    """Map of the centre unit after ``n`` all-ones ``K x K`` convolutions: the n-fold
    convolution of a box, per axis (DESIGN §2), around the centre pixel."""
    profile = np.ones(1)
    for _ in range(n):
        profile = np.convolve(profile, np.ones(K))
    line = np.zeros(SIZE)
    c, half = SIZE // 2, (len(profile) - 1) // 2
    line[c - half : c + half + 1] = profile
    return np.outer(line, line)


def extent(a: np.ndarray, t: float) -> tuple[int, float]:
    """``(m(t), a(t))``: first centred odd square holding more than ``t`` of the mass."""
    total, c = a.sum(), SIZE // 2
    for i in range(SIZE):
        lo, hi = max(c - i, 0), min(c + i, SIZE - 1)
        if a[lo : hi + 1, lo : hi + 1].sum() > t * total:
            return 2 * i + 1, (hi - lo + 1) ** 2 / SIZE**2
    raise AssertionError("no square holds the mass")


def expected_cells(n: int) -> list[str]:
    a = box_stack_map(n)
    cells = [f"{100 * extent(a, t)[1]:.2f}" for t in (0.2, 0.3, 0.5, 0.99)]
    m, cov = extent(a, 0.95)
    return [*cells, str(m), f"{100 * cov:.2f}"]


def expected_tex_cells(n: int) -> list[str]:
    """The LaTeX table rounds to 3 significant digits (tex_number's doctests: the rule)."""
    a = box_stack_map(n)
    cells = [
        f"{100 * extent(a, t)[1]:.{sig3(100 * extent(a, t)[1])}f}" for t in (0.2, 0.3, 0.5, 0.99)
    ]
    m, cov = extent(a, 0.95)
    return [*cells, str(m), f"{100 * cov:.{sig3(100 * cov)}f}"]


def sig3(x: float) -> int:
    """Decimal places of 3 significant digits."""
    return max(0, 2 - math.floor(math.log10(abs(x))))


def md_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[2:]]


def tex_rows(text: str) -> list[list[str]]:
    body = text[text.index(r"\begin{tabular}") :].splitlines()
    rows = [ln for ln in body if ln.endswith(r"\\")]
    return [[c.strip() for c in ln[: -len(r"\\")].split(" & ")] for ln in rows[1:]]


COMMON = ["--input-size", str(SIZE), "--channels", "1", "--samples", "2", "--quiet"]


# -- tables and figures ------------------------------------------------------------------------
def test_batch_writes_folders_tables_and_a_grid(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    specs = [f"{models}:two", f"{models}:three"]
    args = [*specs, *COMMON, "--layers", "0", "1", "--names", "box_2,box|3 & 50%"]
    argv = ["analyze", *args, "--table", "md,latex", "--format", "svg", "--out", str(out)]
    assert main(argv) == 0
    for folder in ("box_2", "box_3_50"):
        record = json.loads((out / folder / "metrics.json").read_text())
        assert record["world_size"] == 1 and record["name"] in ("box_2", "box|3 & 50%")
        assert (out / folder / "maps.npz").is_file() and (out / folder / "table.md").is_file()
        svg = ET.parse(out / folder / "erf_overview.svg").getroot()
        assert svg.tag.endswith("svg")
        for layer in ("0", "1"):  # raster heatmaps as always, and a vector figure
            assert (out / folder / "heatmaps" / f"{layer}.png").is_file()
            assert (
                ET.parse(out / folder / "heatmaps" / f"{layer}.svg").getroot().tag.endswith("svg")
            )
    assert ET.parse(out / "grid.svg").getroot().tag.endswith("svg")

    # layer "0" of either model is one box, layer "1" two boxes
    md = md_rows((out / "table.md").read_text())
    assert [r[:2] for r in md] == [
        ["box_2", "`0`"], ["box_2", "`1`"], [r"box\|3 & 50%", "`0`"], [r"box\|3 & 50%", "`1`"],
    ]  # fmt: skip
    for row in md:
        assert row[2:] == expected_cells(int(row[1].strip("`")) + 1)
    tex = (out / "table.tex").read_text()
    assert tex.startswith("% ERF area ratios") and r"\begin{tabular}{llrrrrrr}" in tex
    assert tex.rstrip().endswith(r"\end{tabular}}")  # closes the group of \arraystretch
    rows = tex_rows(tex)
    assert [r[:2] for r in rows] == [
        [r"box\_2", r"\texttt{0}"], ["", r"\texttt{1}"],
        [r"box|3 \& 50\%", r"\texttt{0}"], ["", r"\texttt{1}"],
    ]  # fmt: skip
    for row in rows:
        assert row[2:] == expected_tex_cells(int(row[1][len(r"\texttt{") : -1]) + 1)


def test_single_model_table_in_its_folder(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "one"
    argv = ["analyze", f"{models}:three", *COMMON, "--layers", "2", "--table", "latex"]
    assert main([*argv, "--format", "pdf", "--out", str(out)]) == 0
    (row,) = tex_rows((out / "table.tex").read_text())
    assert row[2:] == expected_tex_cells(3)
    assert (out / "erf_overview.pdf").read_bytes().startswith(b"%PDF-")
    assert not (out / "table.md").exists() and not (out / "grid.pdf").exists()


def test_bootstrap_intervals_reach_the_tables(models: Path, tmp_path: Path) -> None:
    import erf_monitor as em
    from erf_monitor.cli.models import load_model
    from erf_monitor.measure.bootstrap import bootstrap_metrics

    out = tmp_path / "boot"
    argv = ["analyze", f"{models}:relu_net", "--input-size", "24", "--channels", "1"]
    argv += ["--samples", "6", "--layers", "4", "--bootstrap", "40", "--table", "md,latex"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    # the same probe in the test: the model seeded as the CLI seeds it, the same noise
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = load_model(f"{models}:relu_net")
    x = torch.randn((6, 1, 24, 24), generator=torch.Generator().manual_seed(0))
    r = em.compute_erf(model, x, ["4"], keep_per_sample=True)["4"]
    keys = ["area_t20", "area_t30", "area_t50", "area_t99", "erf_size", "coverage"]
    cis = bootstrap_metrics(r, keys, n_boot=40, level=0.95, seed=0)
    record = json.loads((out / "metrics.json").read_text())
    assert record["bootstrap"] == {"n_boot": 40, "level": 0.95, "method": "bca"}
    saved = record["layers"]["4"]["intervals"]
    for k in keys:
        assert saved[k]["low"] == pytest.approx(cis[k].low)
        assert saved[k]["high"] == pytest.approx(cis[k].high)
    (md,) = md_rows((out / "table.md").read_text())
    lo, hi = cis["coverage"].low * 100, cis["coverage"].high * 100
    assert md[-1] == f"{100 * r.coverage:.2f} ({lo:.2f}–{hi:.2f})"
    (tex,) = tex_rows((out / "table.tex").read_text())
    assert tex[-1] == tex_number(100 * r.coverage, lo, hi)  # significant digits only
    assert "95% BCa bootstrap" in (out / "table.md").read_text()


def test_compare_writes_vector_figures(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", f"{models}:relu_net", f"{models}:relu_net", "--names", "a,b"]
    argv += ["--input-size", "16", "--channels", "1", "--samples", "3", "--layers", "4"]
    assert main([*argv, "--bootstrap", "10", "--format", "pdf", "--out", str(out)]) == 0
    assert (out / "compare.pdf").read_bytes().startswith(b"%PDF-")
    assert not (out / "compare.png").exists()


# -- resuming a batch ----------------------------------------------------------------------------
def test_skip_existing_resumes_an_interrupted_batch(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "batch"
    argv = ["analyze", f"{models}:two", f"{models}:three", f"{models}:relu_net", *COMMON]
    argv += ["--layers", "0", "--table", "md", "--out", str(out)]
    assert main(argv) == 0
    whole = (out / "table.md").read_text()
    # interrupted while the third model was written: its metrics.json (written last) is missing
    first = out / "models.py_two" / "metrics.json"
    before = first.stat().st_mtime_ns, first.read_bytes()
    (out / "models.py_relu_net" / "metrics.json").unlink()
    capsys.readouterr()
    assert main([*argv, "--skip-existing"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped (--skip-existing)") == 2
    assert f"{models}:relu_net: finished" not in printed
    assert (first.stat().st_mtime_ns, first.read_bytes()) == before  # not measured again
    assert (out / "models.py_relu_net" / "metrics.json").is_file()
    assert (out / "table.md").read_text() == whole  # the resumed batch's table is the same

    # a finished folder made with other settings is not mixed in silently
    assert main([*argv, "--skip-existing", "--mode", "replknet"]) == 2
    err = capsys.readouterr().err
    assert "models.py_two" in err and "mode 'luo' -> 'replknet'" in err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--names", "a"], "--names has 1 names for 2 models"),
        (["--table", "html"], "--table must be md, latex"),
        (["--bootstrap", "1"], "--bootstrap must be 0"),
        (["--names", "a b,a:b"], "share the folder 'a_b'"),
        (["--pretrained=w.pt"], "--pretrained=PATH loads one checkpoint"),
    ],
)
def test_batch_usage_errors(
    models: Path, extra: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["analyze", f"{models}:two", f"{models}:three", *COMMON, *extra]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


# -- several processes -------------------------------------------------------------------------
def _flat_metrics(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for layer, rec in record["layers"].items():
        for key, sub in [("", rec), *[(f"/{p}", r) for p, r in rec.get("positions", {}).items()]]:
            out.update({f"{layer}{key}/{k}": v for k, v in sub["metrics"].items()})
            out.update({f"{layer}{key}/ci/{k}": v for k, v in sub.get("intervals", {}).items()})
    return out


def _assert_same_metrics(one: dict[str, Any], two: dict[str, Any]) -> None:
    a, b = _flat_metrics(one), _flat_metrics(two)
    assert a.keys() == b.keys()
    for key, v in a.items():
        w = b[key]
        if isinstance(v, dict):  # an interval record
            for end in ("value", "low", "high"):
                assert w[end] == pytest.approx(v[end], rel=1e-4, abs=1e-6), (key, end)
        elif v is None or isinstance(v, int) or key.endswith(("erf_size", "_period_y")):
            assert v == w, key
        else:  # float sums of the same maps in another order: rounding only
            assert w == pytest.approx(v, rel=1e-4, abs=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", [["--position", "corners"], ["--bootstrap", "20"]], ids=["all-reduce", "gather"]
)
def test_torchrun_two_processes_equal_one(models: Path, tmp_path: Path, extra: list[str]) -> None:
    args = [f"{models}:relu_net", "--input-size", "20", "--channels", "1", "--samples", "5"]
    args += ["--layers", "2", "4", "--table", "md", "--quiet", *extra]  # 5 images: 3 + 2
    assert main(["analyze", *args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launch += ["--nproc_per_node", "2", "-m", "erf_monitor.cli", "analyze"]
    proc = subprocess.run(
        [*launch, *args, "--out", str(tmp_path / "two")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ERF of ") == 1  # rank 0 alone prints and writes
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["input_shape"] == two["input_shape"] == [5, 1, 20, 20]
    _assert_same_metrics(one, two)
    with np.load(tmp_path / "one" / "maps.npz") as a, np.load(tmp_path / "two" / "maps.npz") as b:
        assert a.files == b.files
        for k in a.files:
            if a[k].dtype.kind == "f":
                np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7 * float(a[k].max()))
    if "--position" in extra:
        assert set(two["layers"]["4"]["positions"]) == {
            "corner_top_left", "corner_top_right", "corner_bottom_left", "corner_bottom_right",
        }  # fmt: skip
    assert math.isfinite(two["layers"]["4"]["metrics"]["coverage"])


@pytest.mark.slow
def test_bench_sharded_runs(tmp_path: Path) -> None:
    # The benchmark of the sharded probe (its --quick mode; nothing timed here). It checks the
    # sharded maps against the single-process ones itself.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    script = ROOT / "benchmarks" / "bench_sharded.py"
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["medians_s"]) == {"1 proc, 1 thread", "1 proc, 2 threads", "2 procs"}
