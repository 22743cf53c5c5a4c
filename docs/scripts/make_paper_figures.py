"""Make the figure and tables of docs/guides/papers.md with the command line it documents.

Runs ``erf-monitor analyze`` over three randomly initialised torchvision models (nothing is
downloaded) on noise, as the guide shows, then copies the grid figure to docs/img/papers/
and writes the Markdown table and the start of the LaTeX table into the guide between its
``<!-- papers:... -->`` markers. Run from the repository root (a few minutes on a CPU):

    python docs/scripts/make_paper_figures.py
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import torch

from erf_monitor.cli import main

DOCS = Path(__file__).resolve().parents[1]
GUIDE = DOCS / "guides" / "papers.md"
IMG = DOCS / "img" / "papers"

#: The command of the guide (its flags, after ``erf-monitor analyze``).
ARGS = [
    "torchvision:resnet18", "torchvision:resnet50", "torchvision:convnext_tiny",
    "--names", "ResNet-18,ResNet-50,ConvNeXt-T",
    "--input-size", "128", "--samples", "8", "--bootstrap", "200",
    "--table", "md,latex", "--quiet",
]  # fmt: skip


def put(text: str, marker: str, block: str) -> str:
    pattern = re.compile(rf"(<!-- papers:{marker} -->\n).*?(<!-- /papers:{marker} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{GUIDE} has no <!-- papers:{marker} --> block")
    return pattern.sub(lambda m: m.group(1) + block + m.group(2), text)


def run() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "erf_paper"
        if main(["analyze", *ARGS, "--out", str(out)]) != 0:
            raise SystemExit("erf-monitor analyze failed")
        IMG.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "grid.png", IMG / "grid.png")
        shutil.copy(out / "ResNet-18" / "heatmaps" / "layer3.png", IMG / "heatmap.png")
        md = (out / "table.md").read_text(encoding="utf-8")
        tex = (out / "table.tex").read_text(encoding="utf-8").splitlines()
    text = GUIDE.read_text(encoding="utf-8")
    text = put(text, "table-md", md)
    body = [ln for ln in tex if not ln.startswith("%")]
    head = [*body[:6], r"% ... one row per layer ...", r"\end{tabular}"]
    text = put(text, "table-tex", "```latex\n" + "\n".join(head) + "\n```\n")
    GUIDE.write_text(text, encoding="utf-8")
    print(f"wrote {IMG / 'grid.png'}, {IMG / 'heatmap.png'} and the tables of {GUIDE}")


if __name__ == "__main__":
    run()
