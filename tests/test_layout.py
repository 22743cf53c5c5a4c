"""The package layout shows the pipeline, and imports only flow down it.

Stages, lowest first: ``core`` (shared foundations), ``inputs``, ``targets``, ``trf``, ``viz``,
``measure``, ``probe``, ``sinks``, ``monitor``, ``integrations``, ``cli``, and the package root
(the public surface). A module may import its own stage and the stages below it, never one
above, whether at module level, inside a function or under ``TYPE_CHECKING``; and no imports
run in a circle. A name imported from another folder is public there (no leading underscore).
No function is longer than 100 lines of code: a longer one is split into named helpers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import erf_monitor

PACKAGE = Path(erf_monitor.__file__).parent
STAGES = [
    "core",
    "inputs",
    "targets",
    "trf",
    "viz",
    "measure",
    "probe",
    "sinks",
    "monitor",
    "integrations",
    "cli",
]
ROOT = len(STAGES)  # erf_monitor/__init__.py and the alias modules at the root


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _stage(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in STAGES:
        return ROOT
    return STAGES.index(parts[1])


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``module`` imports (``from pkg import mod`` resolved)."""
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base])
                base = base.rstrip(".")
            for a in node.names:
                if f"{base}.{a.name}" in known:
                    out.add(f"{base}.{a.name}")
                elif base in known:
                    out.add(base)
    return out - {module}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_every_module_belongs_to_a_stage() -> None:
    stray = [m for m in _modules() if _stage(m) == ROOT and m.count(".") > 1]
    assert not stray, stray
    root = sorted(m for m in _modules() if m.count(".") == 1 and m.split(".")[1] not in STAGES)
    # The root holds the public surface only (aliases and the testing helpers).
    assert root == ["erf_monitor.callback", "erf_monitor.testing"], root


def test_imports_only_flow_down_the_pipeline() -> None:
    upward = [
        f"{m} ({STAGES[_stage(m)] if _stage(m) < ROOT else 'root'}) imports {t}"
        for m, targets in _graph().items()
        for t in sorted(targets)
        if _stage(t) > _stage(m) and t != "erf_monitor"
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circles() -> None:
    graph = _graph()
    circles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                circles.append([*stack[stack.index(t) :], t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # A subpackage's __init__ importing its own modules is not a circle of code.
    circles = [c for c in circles if not all(x.startswith(c[0]) for x in c)]
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def _subpackage(module: str) -> str:
    """The folder a module lives in (``erf_monitor`` for the root's modules)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or parts[-1] in STAGES else parts[0]


def test_no_module_imports_another_subpackages_private_name() -> None:
    # A name used outside its folder is public there (no underscore); dunders are allowed.
    found = []
    for module, path in _modules().items():
        pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base]).rstrip(".")
            if not base.startswith("erf_monitor") or _subpackage(base) == _subpackage(module):
                continue
            private = [
                a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")
            ]
            found += [f"{module}:{node.lineno} imports {base}.{n}" for n in private]
    assert not found, "\n".join(found)


def _private_module(module: str) -> bool:
    """Whether a dotted module name has a private part (``sinks._base``; dunders excepted)."""
    return any(p.startswith("_") and not p.endswith("__") for p in module.split(".")[1:])


def test_no_module_imports_another_subpackages_private_module() -> None:
    # Another folder's private module (``sinks._base``) is reached through its public surface
    # (``erf_monitor.sinks``); dunder modules (``__init__``, ``__main__``) are allowed.
    known = set(_modules())
    found = []
    for module, path in _modules().items():
        pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join([*parts[: len(parts) - node.level + 1], base]).rstrip(".")
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
                targets = [t for t in targets if t == base or t in known]
            for t in targets:
                if (
                    t.startswith("erf_monitor")
                    and _private_module(t)
                    and _subpackage(t) != _subpackage(module)
                ):
                    found.append(f"{module}:{node.lineno} imports {t}")
    assert not found, "\n".join(found)


#: The most lines of code a function may have (a longer one is split into named helpers).
MAX_CODE_LINES = 100


def _code_lines(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Non-blank, non-comment lines from ``def`` to the function's end, its docstring excluded
    (nested functions count in their parent too)."""
    first = node.body[0]
    doc = range(0)
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        doc = range(first.lineno, (first.end_lineno or first.lineno) + 1)
    end = node.end_lineno or node.lineno
    return sum(
        1
        for i in range(node.lineno, end + 1)
        if i not in doc and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#")
    )


def test_code_lines_counts_code_only() -> None:
    source = '''
@decorated
def f(a,
      b):
    """Doc.

    More doc."""
    # a comment

    x = a  # code with a comment
    return (x,
            b)
'''
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.FunctionDef)
    assert _code_lines(source.splitlines(), node) == 5


def test_no_function_is_longer_than_100_code_lines() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(lines, node)
                if n > MAX_CODE_LINES:
                    where = path.relative_to(PACKAGE.parent)
                    long.append(f"{where}:{node.lineno} {node.name}: {n} code lines")
    assert not long, f"functions over {MAX_CODE_LINES} code lines (split them):\n" + "\n".join(long)
