"""Griffe extension used by mkdocs.yml: read ``Example:`` docstring sections as ``Examples:``.

The package's Google-style docstrings title their doctests ``Example:`` (singular). Griffe's
Google parser only knows ``Examples:``; anything else becomes an admonition whose ``>>>`` lines
are rendered as Markdown quotes (and ``x[2][4]`` as a broken reference link). Renaming the title
at load time makes the doctests render as code blocks without touching the sources.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section titles to ``Examples:``."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
