"""Resolving user layer specs (names, globs, ``"auto"``) to modules."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["auto_layers", "get_module", "resolve_layers", "unwrap_compiled"]

_COMPILED = "_orig_mod"


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """Return the eager module behind ``torch.compile(model)`` (or ``model`` itself)."""
    inner = getattr(model, _COMPILED, None)
    return inner if isinstance(inner, nn.Module) else model


def _canonical(name: str) -> str:
    # torch.compile'd submodules appear as "net._orig_mod.layer1": users may omit that segment.
    return ".".join(p for p in name.split(".") if p != _COMPILED)


def _module_table(model: nn.Module) -> dict[str, nn.Module]:
    table: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name:
            table.setdefault(_canonical(name), module)
    return table


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Glob over dotted names: ``*`` and ``?`` stay inside one segment, ``**`` spans segments."""
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
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out.append(
                "[^" + re.escape(body[1:]) + "]" if body.startswith("!") else f"[{re.escape(body)}]"
            )
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _unknown_layer_error(name: str, names: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    shown = ", ".join(names[:25]) + (f", ... ({len(names)} in all)" if len(names) > 25 else "")
    return ValueError(
        f"Unknown layer {name!r}.{hint} Layers are named as in model.named_modules(): {shown}"
    )


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """Expand layer names and glob patterns into an ordered, de-duplicated list of names.

    Args:
        model: the model whose ``named_modules()`` define the names.
        layers: a name, a glob, or a sequence of them. In globs ``*`` and ``?`` match within
            one dotted segment (``"layer*"`` is ``layer1 .. layer4``, not their children) and
            ``**`` matches across segments (``"layer1.**.conv*"``). ``"auto"`` needs an
            input and is expanded by :func:`auto_layers` instead.

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
    """
    specs = [layers] if isinstance(layers, str) else list(layers)
    if not specs:
        raise ValueError("No layers given: pass at least one layer name, a glob, or 'auto'.")
    table = _module_table(unwrap_compiled(model))
    names = list(table)
    out: list[str] = []
    for spec in specs:
        if not isinstance(spec, str):
            raise TypeError(f"Layer names must be strings, got {type(spec).__name__}: {spec!r}")
        spec = _canonical(spec)
        if spec in table:
            matched = [spec]
        elif any(ch in spec for ch in "*?["):
            regex = _glob_regex(spec)
            matched = [n for n in names if regex.fullmatch(n)]
            if not matched:
                raise _unknown_layer_error(spec, names)
        else:
            raise _unknown_layer_error(spec, names)
        out.extend(m for m in matched if m not in out)
    return out


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The module called ``name`` (``_orig_mod`` segments optional)."""
    table = _module_table(unwrap_compiled(model))
    try:
        return table[_canonical(name)]
    except KeyError:
        raise _unknown_layer_error(name, list(table)) from None


def auto_layers(
    model: nn.Module,
    x: torch.Tensor,
    forward_fn: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> list[str]:
    """Pick one layer per spatial resolution stage: the outermost module finishing last there.

    Runs one forward pass (no gradients, eval mode, every module's ``training`` flag restored)
    and records the spatial shape of every module output that looks like ``(N, C, *S)``.
    For each distinct spatial shape (1x1 excluded) the module whose forward *finished last*
    with that shape is chosen: forward hooks of containers fire after their children, so in
    a torchvision ResNet this yields ``relu`` (stem), ``layer1`` ... ``layer4``.
    """
    net = unwrap_compiled(model)
    spatial_ndim = x.dim() - 2
    finished: list[tuple[str, tuple[int, ...]]] = []
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == spatial_ndim + 2:
                finished.append((name, tuple(out.shape[2:])))

        return hook

    flags = {m: m.training for m in net.modules()}
    try:
        for name, module in _module_table(net).items():
            handles.append(module.register_forward_hook(make_hook(name)))
        net.eval()
        with torch.no_grad():
            (forward_fn or (lambda m, t: m(t)))(net, x)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    last_by_shape: dict[tuple[int, ...], str] = {}
    order: list[tuple[int, ...]] = []
    for name, shape in finished:
        if all(s == 1 for s in shape):
            continue
        if shape not in last_by_shape:
            order.append(shape)
        last_by_shape[shape] = name
    if not order:
        raise ValueError(
            "layers='auto' found no module with a spatial output (N, C, *S); "
            "name the layers explicitly."
        )
    return [last_by_shape[s] for s in order]
