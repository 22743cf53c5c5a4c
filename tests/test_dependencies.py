"""Every third-party package the source imports is declared in pyproject.toml, and every core
dependency is imported.

Imports are read from the source (``import x``, ``from x import y``, and the string given to
``importlib.import_module``, ``package_available`` or ``require``), at module level or inside
functions: a lazily imported package is still needed by the feature that imports it. A
package counts as declared when it is a core dependency or in an extra other than ``dev``.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "src" / "erf_monitor"
#: Import names whose distribution is spelled otherwise (besides ``_`` for ``-``).
DISTRIBUTION = {"PIL": "pillow"}
#: Functions whose first argument (a string) names a module to import.
IMPORTERS = {"import_module", "package_available", "require"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return _normalise(match.group())


def imported_modules(source: str) -> set[str]:
    """Top-level names of the modules ``source`` imports (relative imports left out).

    Examples:
        >>> sorted(imported_modules("import a.b\\nfrom c import d\\nfrom . import e\\n"
        ...                         "importlib.import_module('f.g')"))
        ['a', 'c', 'f']
    """
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
            if name in IMPORTERS and literal:
                out.add(first.value.split(".")[0])
    return out


def third_party_imports() -> dict[str, list[str]]:
    """``{distribution: [files importing it]}`` over the package's source."""
    found: dict[str, list[str]] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        for module in imported_modules(path.read_text()):
            if module in sys.stdlib_module_names or module in ("erf_monitor", "__future__"):
                continue
            dist = DISTRIBUTION.get(module, _normalise(module))
            found.setdefault(dist, []).append(str(path.relative_to(REPO)))
    return found


def project() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def test_every_imported_package_is_declared() -> None:
    meta = project()
    declared = {_requirement_name(r) for r in meta["dependencies"]}
    for extra, requirements in meta["optional-dependencies"].items():
        if extra != "dev":
            declared |= {_requirement_name(r) for r in requirements}
    missing = {d: files for d, files in third_party_imports().items() if d not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_core_dependency_is_imported() -> None:
    imported = set(third_party_imports())
    core = {_requirement_name(r) for r in project()["dependencies"]}
    assert not core - imported, f"core dependencies never imported: {sorted(core - imported)}"


def test_the_distributions_named_here_are_spelled_as_installed() -> None:
    # PIL -> pillow etc.: the mapping agrees with what the installed distributions provide.
    from importlib.metadata import packages_distributions

    provided = packages_distributions()
    for module, dist in DISTRIBUTION.items():
        assert dist in {_normalise(d) for d in provided.get(module, [])}, module
