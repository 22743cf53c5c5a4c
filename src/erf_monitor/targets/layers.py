"""Resolving user layer specs (names, globs, output selectors, ``"auto"``) to modules.

A layer spec is a module name as in ``model.named_modules()``, optionally followed by an
*output selector* that picks one tensor out of what the module returns::

    spec      := path step*
    path      := dotted module name; in globs ``*``/``?`` stay in one segment, ``**`` spans them
    step      := "[" key "]" | "." field
    key       := integer            tuple/list index, or a dict key (int, or its str spelling)
               | 'text' | "text"    dict key, ModelOutput/dataclass field
               | bare text          the same as 'text'
    field     := identifier         dict key, ModelOutput/dataclass field or attribute

Examples: ``"backbone['0']"`` (an FPN level of a torchvision detection backbone),
``"backbone[0]"`` (the same level: ``0`` falls back to the key ``'0'``),
``"swin.encoder.layers.0[0]"`` (first element of a Hugging Face Swin stage's tuple),
``"vit.encoder[last_hidden_state]"`` (a ModelOutput field), ``"layer[0]['feat']"``
(chained), ``"head[-1].logits"`` (a field after a bracket). The dotted part before the first
bracket is always a module path: a name that is no module is an unknown layer (close matches
listed), never a field. Globs take bracket selectors: ``"encoder.layers.*[0]"``.

Wrappers are transparent: ``torch.compile``'s ``_orig_mod`` segments may be omitted, and the
``module.`` prefix of ``DataParallel``/``DistributedDataParallel`` may be given or omitted
(the probe runs the wrapped module itself).
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from erf_monitor.core.index import ModelIndex, index_of

__all__ = [
    "Located",
    "Selector",
    "UnknownLayerError",
    "format_selector",
    "locate_layer",
    "locate_layers",
    "module_table",
    "parse_layer_spec",
    "resolve_layers",
    "spec_matches",
    "unwrap_model",
]

log = logging.getLogger("erf_monitor")

_COMPILED = "_orig_mod"
_WRAPPER_PREFIX = "module."

#: One step of an output selector: an int index or a str key / field name.
Step = int | str
Selector = tuple[Step, ...]


@dataclass(frozen=True)
class Located:
    """One layer spec, looked up once: what every later stage reads instead of the spec.

    Attributes:
        spec: the layer spec as given (the key of its results).
        path: the module's name in the unwrapped model (no ``_orig_mod``, no ``module.``).
        module: the module whose first output is probed.
        selector: the output selector applied to that output (``()``: all of it).
    """

    spec: str
    path: str
    module: nn.Module
    selector: Selector


# ----------------------------------------------------------------------------- wrappers


def _is_wrapper(model: nn.Module) -> bool:
    return isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The eager module behind ``torch.compile``, ``DataParallel`` and DDP wrappers.

    The probe runs this module directly: hooks stay on one replica, and a DDP forward (which
    expects a training backward) is never started by a probe.
    """
    while True:
        inner = getattr(model, _COMPILED, None)
        if isinstance(inner, nn.Module):
            model = inner
        elif _is_wrapper(model) and isinstance(getattr(model, "module", None), nn.Module):
            model = getattr(model, "module")  # noqa: B009 (typed as Tensor | Module)
        else:
            return model


def _canonical(name: str) -> str:
    # torch.compile'd submodules appear as "net._orig_mod.layer1": users may omit that segment.
    return ".".join(p for p in name.split(".") if p != _COMPILED)


def module_table(model: nn.Module | ModelIndex) -> dict[str, nn.Module]:
    """``{name: module}`` of every named submodule, ``_orig_mod`` segments dropped (``model``
    may be an index of the model: read, not walked again)."""
    table: dict[str, nn.Module] = {}
    for name, module in index_of(model).named:
        if name:
            table.setdefault(_canonical(name), module)
    return table


def _lookup(table: dict[str, nn.Module], path: str) -> str | None:
    """The table key for ``path``, with the wrapper's ``module.`` prefix given or not."""
    if path in table:
        return path
    if path.startswith(_WRAPPER_PREFIX) and path[len(_WRAPPER_PREFIX) :] in table:
        return path[len(_WRAPPER_PREFIX) :]
    if _WRAPPER_PREFIX + path in table:
        return _WRAPPER_PREFIX + path
    return None


# ----------------------------------------------------------------------------- grammar

_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT = re.compile(r"-?\d+")


def _parse_key(text: str, spec: str) -> Step:
    text = text.strip()
    if not text:
        raise ValueError(f"Empty selector [] in layer spec {spec!r}.")
    if _INT.fullmatch(text):
        return int(text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if any(q in text for q in "'\""):
        raise ValueError(f"Unbalanced quotes in selector [{text}] of layer spec {spec!r}.")
    return text


def parse_layer_spec(spec: str) -> tuple[str, Selector]:
    """Split a layer spec into its module path and output selector (syntax only).

    Everything before the first ``[`` is the module path; ``.field`` steps are only read after
    a bracket (``"head[-1].logits"``).

    Raises:
        ValueError: for a malformed selector (unbalanced brackets or quotes, empty ``[]``).

    Examples:
        >>> parse_layer_spec("backbone['0']")
        ('backbone', ('0',))
        >>> parse_layer_spec("layer[0]['feat']")
        ('layer', (0, 'feat'))
        >>> parse_layer_spec("vit.encoder[last_hidden_state]")
        ('vit.encoder', ('last_hidden_state',))
        >>> parse_layer_spec("head[-1].logits")
        ('head', (-1, 'logits'))
    """
    i = spec.find("[")
    if i < 0:
        return spec, ()
    path, rest, steps = spec[:i], spec[i:], []
    pos = 0
    while pos < len(rest):
        ch = rest[pos]
        if ch == "[":
            end = pos + 1
            quote = None
            while end < len(rest) and (quote is not None or rest[end] != "]"):
                if rest[end] in "'\"":
                    quote = None if quote == rest[end] else (quote or rest[end])
                end += 1
            if end >= len(rest):
                raise ValueError(f"Unclosed '[' in layer spec {spec!r}.")
            steps.append(_parse_key(rest[pos + 1 : end], spec))
            pos = end + 1
        elif ch == ".":
            m = _FIELD.match(rest, pos + 1)
            if m is None:
                raise ValueError(f"Expected a field name after '.' in layer spec {spec!r}.")
            steps.append(m.group())
            pos = m.end()
        else:
            raise ValueError(
                f"Unexpected {ch!r} in layer spec {spec!r}: after the module name only "
                "[index], ['key'] and .field selectors may follow."
            )
    return path, tuple(steps)


def format_selector(selector: Selector) -> str:
    """Canonical text of a selector: ``[0]`` for indices, ``['key']`` for keys and fields.

    Examples:
        >>> format_selector((0, "feat"))
        "[0]['feat']"
    """
    out = []
    for step in selector:
        if isinstance(step, int):
            out.append(f"[{step}]")
        else:
            out.append(f'["{step}"]' if "'" in step else f"['{step}']")
    return "".join(out)


def _split(spec: str, table: dict[str, nn.Module]) -> tuple[str, Selector] | None:
    """``(table key, selector)`` of an exact (non-glob) spec, or ``None`` if it names nothing."""
    try:
        path, selector = parse_layer_spec(spec)
    except ValueError:
        return None
    # The dotted path is modules only: a field needs brackets ("vit.encoder[pooled]"), so a
    # mistyped module name is an unknown layer at once, never a selector that fails later.
    key = _lookup(table, _canonical(path))
    return None if key is None else (key, selector)


# ----------------------------------------------------------------------------- resolution


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Glob over dotted names: ``*`` and ``?`` stay inside one segment, ``**`` spans segments.

    ``[...]`` is a character class, or, when the pattern ends with an output selector, that
    selector literally: ``"stages.*[0]"`` matches ``stages.1[0]`` (and, as a character class,
    ``stages.10``).
    """
    plain = _glob_body(pattern)
    try:
        path, selector = parse_layer_spec(pattern)
    except ValueError:
        selector = ()
    if not selector:
        return re.compile(plain)
    literal = _glob_body(path, classes=False) + re.escape(pattern[len(path) :])
    return re.compile(f"(?:{plain})|(?:{literal})")


def spec_matches(name: str, pattern: str) -> bool:
    """Whether layer ``name`` is ``pattern`` or matched by it as a glob (selectors literal)."""
    return name == pattern or bool(_glob_regex(pattern).fullmatch(name))


def _glob_body(pattern: str, classes: bool = True) -> str:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^.]")
            i += 1
        elif classes and pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out.append(
                "[^" + re.escape(body[1:]) + "]" if body.startswith("!") else f"[{re.escape(body)}]"
            )
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def _wrapper_of(model: nn.Module) -> str | None:
    """Name of the DataParallel/DDP wrapper class around ``model`` (compile unwrapped)."""
    while True:
        inner = getattr(model, _COMPILED, None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        return type(model).__name__ if _is_wrapper(model) else None


class UnknownLayerError(ValueError):
    """A layer name that matches no module; ``layer``, ``close`` (its close matches) and
    ``names`` (every layer) let the command line say it in one short line."""

    def __init__(
        self, message: str, layer: str, close: Sequence[str], names: Sequence[str]
    ) -> None:
        super().__init__(message)
        self.layer = layer
        self.close = list(close)
        self.names = list(names)


def _unknown_layer_error(name: str, names: Sequence[str], wrapper: str | None = None) -> ValueError:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    shown = ", ".join(names[:25]) + (f", ... ({len(names)} in all)" if len(names) > 25 else "")
    where = "model.named_modules()"
    if wrapper is not None:
        where = (
            f"the named_modules() of the module inside {wrapper} (with or without its "
            "'module.' prefix of DataParallel/DDP)"
        )
    return UnknownLayerError(
        f"Unknown layer {name!r}.{hint} Layers are named as in {where}, optionally followed "
        f"by an output selector such as [0] or ['key']: {shown}",
        name,
        close,
        names,
    )


def _glob_matches(spec: str, names: list[str]) -> list[str]:
    """Names matched by a glob ``spec`` (bracket selectors kept), ``[]`` if none."""
    try:
        path, selector = parse_layer_spec(spec)
    except ValueError:
        path, selector = spec, ()
    if selector and any(ch in path for ch in "*?"):
        suffix = spec[len(path) :]
        for pattern in (path, *_wrapper_variants(path)):
            regex = _glob_regex(pattern)
            found = [n + suffix for n in names if regex.fullmatch(n)]
            if found:
                return found
        return []
    if not any(ch in spec for ch in "*?["):
        return []
    for pattern in (spec, *_wrapper_variants(spec)):
        regex = _glob_regex(pattern)
        found = [n for n in names if regex.fullmatch(n)]
        if found:
            return found
    return []


def _wrapper_variants(pattern: str) -> list[str]:
    if pattern.startswith(_WRAPPER_PREFIX):
        return [pattern[len(_WRAPPER_PREFIX) :]]
    return [_WRAPPER_PREFIX + pattern]


def resolve_layers(
    model: nn.Module, layers: str | Sequence[str], table: dict[str, nn.Module] | None = None
) -> list[str]:
    """Expand layer specs and glob patterns into an ordered, de-duplicated list of names.

    Args:
        model: the model whose ``named_modules()`` define the names (wrappers unwrapped).
        layers: a spec, a glob, or a sequence of them (see the module docstring for output
            selectors). In globs ``*`` and ``?`` match within one dotted segment
            (``"layer*"`` is ``layer1 .. layer4``, not their children) and ``**`` matches
            across segments (``"layer1.**.conv*"``); a selector after a glob applies to every
            match. ``"auto"`` needs an input and is expanded by :func:`auto_layers` instead.
        table: the model's :func:`module_table`, when the caller built it already.

    Returns:
        The names as given (exact specs keep their spelling, so that results are keyed the
        way they were asked for), globs expanded in module order.

    Raises:
        ValueError: for an unknown name or a glob that matches nothing (close matches listed).

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        >>> resolve_layers(net, ["0", "2"])
        ['0', '2']
        >>> resolve_layers(net, "*")
        ['0', '1', '2']
        >>> resolve_layers(nn.Sequential(net), "0.*")
        ['0.0', '0.1', '0.2']
        >>> resolve_layers(nn.Sequential(net), "0[0]")  # a selector on the output of '0'
        ['0[0]']
    """
    return [spec for spec, _hit in _expand(model, layers, table)]


def locate_layers(
    model: nn.Module,
    layers: str | Sequence[str] | Sequence[Located],
    table: dict[str, nn.Module] | None = None,
) -> list[Located]:
    """:func:`resolve_layers` and :func:`locate_layer` in one pass: each spec (each glob
    match) is looked up once. Already located layers are returned as they are.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> [(t.spec, t.path, t.selector) for t in locate_layers(net, ["0", "*[0]"])]
        [('0', '0', ()), ('0[0]', '0', (0,)), ('1[0]', '1', (0,))]
    """
    if not isinstance(layers, str) and layers and all(isinstance(t, Located) for t in layers):
        return list(layers)  # type: ignore[arg-type]
    if table is None:
        table = module_table(unwrap_model(model))
    out = []
    for spec, hit in _expand(model, layers, table):  # type: ignore[arg-type]
        if hit is None:  # a glob's match: looked up here, once
            hit = _split(_canonical_spec(spec), table)
            if hit is None:
                raise _unknown_layer_error(spec, list(table), _wrapper_of(model))
        out.append(Located(spec, hit[0], table[hit[0]], hit[1]))
    return out


def _expand(
    model: nn.Module, layers: str | Sequence[str], table: dict[str, nn.Module] | None
) -> Iterator[tuple[str, tuple[str, Selector] | None]]:
    """``(spec, (table key, selector))`` of each exact spec, ``(match, None)`` of each glob
    match, in order, de-duplicated (see :func:`resolve_layers`)."""
    specs = [layers] if isinstance(layers, str) else list(layers)
    if not specs:
        raise ValueError("No layers given: pass at least one layer name, a glob, or 'auto'.")
    if table is None:
        table = module_table(unwrap_model(model))
    names = list(table)
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, str):
            raise TypeError(f"Layer names must be strings, got {type(spec).__name__}: {spec!r}")
        given, spec = spec, _canonical_spec(spec)
        try:
            path = _canonical(parse_layer_spec(spec)[0])
            syntax_error: ValueError | None = None
        except ValueError as exc:
            path, syntax_error = spec, exc
        hit = None if syntax_error or any(c in path for c in "*?") else _split(spec, table)
        if hit is not None:
            key = _lookup(table, path)
            if key is not None and key != path:
                where = _wrapper_of(model) or type(unwrap_model(model)).__name__
                log.info("erf-monitor: layer %r is module %r inside %s", spec, key, where)
            matched = [given]  # as spelled: results are keyed the way they were asked for
        else:
            matched = _glob_matches(spec, names)
            hit = None
        if not matched:
            if syntax_error is not None and any(q in spec for q in "'\""):
                raise syntax_error
            raise _unknown_layer_error(spec, names, _wrapper_of(model))
        for m in matched:
            if m not in seen:
                seen.add(m)
                yield m, hit


def _canonical_spec(spec: str) -> str:
    """``spec`` with ``_orig_mod`` segments dropped from its module path (selector untouched)."""
    i = spec.find("[")
    path, rest = (spec, "") if i < 0 else (spec[:i], spec[i:])
    return _canonical(path) + rest


def locate_layer(
    model: nn.Module, name: str, table: dict[str, nn.Module] | None = None
) -> tuple[str, nn.Module, Selector]:
    """``(module name, module, output selector)`` of one exact layer spec.

    The module name is the one in ``unwrap_model(model).named_modules()`` (without
    ``_orig_mod``), whatever wrapper prefix the spec used. ``table`` (from ``module_table``)
    saves rebuilding the name table when many names are located.

    Raises:
        ValueError: for a name that matches no module (close matches listed).
    """
    if table is None:
        table = module_table(unwrap_model(model))
    hit = _split(_canonical_spec(name), table)
    if hit is None:
        raise _unknown_layer_error(name, list(table), _wrapper_of(model))
    return hit[0], table[hit[0]], hit[1]
