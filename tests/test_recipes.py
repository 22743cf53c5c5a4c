"""The recipes of docs/guides/models.md and docs/guides/detection-segmentation.md run as written.

Each page's ``python`` blocks run in order in one fresh interpreter (in a folder with a few
images in ``val_images/``), and what they print must be what the page shows in the ``text``
block under each of them: layer names, output grids, TRFs and strides exactly; ERF sizes and
coverages (float-sensitive) only in form.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^( *)```(python|text)\n(.*?)^\1```", flags=re.S | re.M)
FLOATY = [(re.compile(r"ERF \d+ px"), "ERF # px"), (re.compile(r"coverage \d\.\d+"), "coverage #")]


def page_blocks(page: Path) -> tuple[str, list[str]]:
    """The page's code, and the output it documents (text blocks right after a code block)."""
    code, shown = [], []
    previous = None
    for _indent, kind, body in BLOCK.findall(page.read_text(encoding="utf-8")):
        body = textwrap.dedent(body)
        if kind == "python":
            code.append(body)
        elif previous == "python":
            shown.extend(body.rstrip("\n").splitlines())
        previous = kind
    return "\n".join(code), shown


def normalise(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        for pattern, repl in FLOATY:
            line = pattern.sub(repl, line)
        out.append(line.rstrip())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("page", ["models.md", "detection-segmentation.md"])
def test_docs_recipe_runs_and_prints_what_the_page_shows(page: str, tmp_path: Path) -> None:
    for module in ("torchvision", "timm", "transformers", "segmentation_models_pytorch"):
        pytest.importorskip(module)
    code, shown = page_blocks(ROOT / "docs" / "guides" / page)
    assert code and shown
    rng = np.random.default_rng(0)
    (tmp_path / "val_images").mkdir()
    for i in range(3):
        pixels = (rng.random((100 + 10 * i, 120, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(tmp_path / "val_images" / f"im{i}.png")
    script = tmp_path / "recipe.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + code, encoding="utf-8")
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert normalise(proc.stdout.splitlines()) == normalise(shown)
