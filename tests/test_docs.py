"""The README's and every documentation page's code runs as written, so the docs cannot rot.

Every fenced ``python`` block of ``README.md`` and of every ``docs/**/*.md`` page runs: a page's
blocks in order, as one script, in a fresh interpreter started in an empty folder, the way a
reader who pastes them one after another runs them (a later block continues the earlier ones).
The script keeps the page's line numbers (every other line is blank), so a traceback's
``<page>.py", line N`` is line N of the page. The folder holds three small images in
``val_images/`` for pages that load a folder of images; nothing is downloaded
(``HF_HUB_OFFLINE=1``, W&B offline).

A block that must not run (it needs two GPUs, or it is a sketch of a user's own code) is
marked by an HTML comment, which the rendered page does not show, on the line right before its
fence, with the reason::

    <!-- no-run: needs two GPUs -->
    ```python
    ...

Use it sparingly: every guide must open with a block that runs. On the pages of
``PRINTS_AS_SHOWN`` a ``text`` block right after a ``python`` block shows what the code prints,
and the run must print exactly that (ERF sizes and coverages, float-sensitive, only in form).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from markdown_it import MarkdownIt
from PIL import Image

from conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NO_RUN = re.compile(r"^\s*<!--\s*no-run\s*(?::\s*(?P<reason>.*?))?\s*-->\s*$")
#: Pages whose ``text`` blocks show the output of the ``python`` block before them.
PRINTS_AS_SHOWN = {"docs/guides/models.md", "docs/guides/detection-segmentation.md"}
FLOATY = [(re.compile(r"ERF \d+ px"), "ERF # px"), (re.compile(r"coverage \d\.\d+"), "coverage #")]


@dataclass
class Block:
    """One fenced block: its language, first code line (0-based) and code."""

    lang: str
    line: int
    code: str
    no_run: str | None  # the reason, when marked no-run


def blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown page (``python`` and ``text``), in order.

    Raises:
        ValueError: a ``no-run`` mark without a reason.
    """
    lines = text.splitlines()
    out = []
    for token in MarkdownIt("commonmark").parse(text):
        lang = token.info.strip().split(" ")[0] if token.type == "fence" else ""
        if lang not in ("python", "text") or token.map is None:
            continue
        fence = token.map[0]
        before = next((lines[i] for i in range(fence - 1, -1, -1) if lines[i].strip()), "")
        mark = NO_RUN.match(before)
        if mark and not mark.group("reason"):
            raise ValueError(
                f"line {fence}: '<!-- no-run -->' needs a reason: <!-- no-run: why -->"
            )
        reason = mark.group("reason") if mark else None
        out.append(Block(lang, fence + 1, token.content, reason))
    return out


def page_script(text: str) -> str:
    """The page's runnable ``python`` blocks as one script, on the page's own line numbers."""
    script = [""] * len(text.splitlines())  # script[i] is line i + 1, as on the page
    for b in blocks(text):
        if b.lang == "python" and b.no_run is None:
            for i, code_line in enumerate(b.code.splitlines()):
                script[b.line + i] = code_line
    return "\n".join(script) + "\n"


def shown_output(text: str) -> list[str]:
    """The lines of the ``text`` blocks that follow a ``python`` block."""
    shown: list[str] = []
    previous = None
    for b in blocks(text):
        if b.lang == "text" and previous == "python":
            shown.extend(b.code.rstrip("\n").splitlines())
        previous = b.lang
    return shown


def normalise(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        for pattern, repl in FLOATY:
            line = pattern.sub(repl, line)
        out.append(line.rstrip())
    return out


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


RUNNABLE = [p for p in PAGES if page_script(p.read_text(encoding="utf-8")).strip()]


# ----------------------------------------------------------------------------- the extractor
def test_script_keeps_page_lines_and_leaves_out_marked_blocks() -> None:
    page = "\n".join(
        [
            "# Title",  # 1
            "```python",  # 2
            "x = 1",  # 3
            "```",  # 4
            "<!-- no-run: needs two GPUs -->",  # 5
            "```python",  # 6
            "raise SystemExit('must not run')",  # 7
            "```",  # 8
            "- a list item:",  # 9
            "",  # 10
            "  ```python",  # 11
            "  y = x + 1",  # 12
            "  ```",  # 13
            "```bash",  # 14
            "echo not python",  # 15
            "```",  # 16
        ]
    )
    script = page_script(page).splitlines()
    assert script[2] == "x = 1" and script[11] == "y = x + 1"  # line N of the page
    assert "must not run" not in "\n".join(script) and "echo" not in "\n".join(script)
    assert [b.no_run for b in blocks(page)] == [None, "needs two GPUs", None]
    ns: dict[str, object] = {}
    exec(compile("\n".join(script), "page.md", "exec"), ns)
    assert ns["y"] == 2


def test_no_run_mark_needs_a_reason() -> None:
    with pytest.raises(ValueError, match="needs a reason"):
        blocks("<!-- no-run -->\n```python\nx = 1\n```\n")


def test_every_guide_opens_with_a_block_that_runs() -> None:
    guides = sorted((ROOT / "docs" / "guides").glob("*.md"))
    assert len(guides) >= 10
    for page in [ROOT / "README.md", *guides]:
        code = [b for b in blocks(page.read_text(encoding="utf-8")) if b.lang == "python"]
        if code:  # a guide of command lines only has no python block
            assert code[0].no_run is None, f"{_rel(page)}: its first python block does not run"
    for page in PAGES:  # and every mark is well-formed (a reason given)
        blocks(page.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- the pages
def _images(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = (rng.random((100 + 10 * i, 120, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"im{i}.png")


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=[_rel(p) for p in RUNNABLE])
def test_page_runs_as_written(page: Path, tmp_path: Path) -> None:
    text = page.read_text(encoding="utf-8")
    script = tmp_path / f"{page.name}.py"  # tracebacks name the page
    script.write_text(page_script(text), encoding="utf-8")
    _images(tmp_path / "val_images")
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",  # two pytest workers share two cores
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])
        ),
    }
    proc = subprocess.run(
        [sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert proc.returncode == 0, f"{_rel(page)} failed:\n{proc.stderr[-4000:]}"
    if _rel(page) in PRINTS_AS_SHOWN:
        shown = shown_output(text)
        assert shown, f"{_rel(page)} shows no output to compare"
        assert normalise(proc.stdout.splitlines()) == normalise(shown)
