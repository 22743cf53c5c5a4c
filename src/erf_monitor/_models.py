"""Turn a ``MODEL`` spec of the command line into an ``nn.Module``.

Three forms are accepted:

* ``torchvision:<name>`` — ``torchvision.models.get_model(name, weights=None)`` (random init,
  nothing is downloaded);
* ``timm:<name>`` — ``timm.create_model(name, pretrained=False)`` when timm is installed;
* ``path/to/file.py:factory`` — **runs that file** and calls ``factory()``; the only form that
  executes user code.

Every failure is a :class:`ModelSpecError` with a one-line message that says what to do.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from torch import nn

from erf_monitor._imports import package_available

__all__ = ["ModelSpecError", "load_model"]

_PREFIXES = ("torchvision", "timm")


class ModelSpecError(ValueError):
    """A ``MODEL`` spec that cannot be turned into a model (bad prefix, name, file, factory)."""


def _close(name: str, choices: list[str], n: int = 5) -> str:
    matches = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not matches:
        lowered = name.lower()
        matches = [c for c in choices if lowered in c.lower()][:n]
    return f" Did you mean: {', '.join(matches)}?" if matches else ""


def _torchvision(name: str) -> nn.Module:
    if not package_available("torchvision"):
        raise ModelSpecError(
            "torchvision is not installed: pip install erf-monitor[vision] (or torchvision)"
        )
    import torchvision.models as tvm

    available = sorted(tvm.list_models())
    if name not in available:
        raise ModelSpecError(
            f"torchvision has no model {name!r}.{_close(name, available)} "
            "(all names: torchvision.models.list_models())"
        )
    return tvm.get_model(name, weights=None)


def _timm(name: str) -> nn.Module:
    if not package_available("timm"):
        raise ModelSpecError(f"timm:{name} needs timm, which is not installed: pip install timm")
    timm: Any = importlib.import_module("timm")
    available = list(timm.list_models())
    if name not in available:
        raise ModelSpecError(f"timm has no model {name!r}.{_close(name, available)}")
    return timm.create_model(name, pretrained=False)


def _from_file(path_text: str, factory: str) -> nn.Module:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ModelSpecError(f"model file {str(path)!r} does not exist (spec: FILE.py:FACTORY)")
    if path.suffix != ".py":
        raise ModelSpecError(f"model file {str(path)!r} is not a .py file (spec: FILE.py:FACTORY)")
    if not factory.isidentifier():
        raise ModelSpecError(
            f"{factory!r} is not a valid Python name for the factory (spec: FILE.py:FACTORY)"
        )
    module_name = f"_erf_monitor_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - .py files always have one
        raise ModelSpecError(f"cannot import {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ModelSpecError(
            f"importing {str(path)!r} failed: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    fn = getattr(module, factory, None)
    if fn is None:
        names = [n for n in vars(module) if callable(vars(module)[n]) and not n.startswith("_")]
        raise ModelSpecError(
            f"{str(path)!r} has no {factory!r}.{_close(factory, names)} "
            f"Callables found: {', '.join(sorted(names)) or 'none'}."
        )
    if not callable(fn):
        raise ModelSpecError(f"{factory!r} in {str(path)!r} is not callable")
    try:
        model = fn()
    except Exception as exc:
        raise ModelSpecError(
            f"{factory}() in {str(path)!r} failed: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"{factory}() in {str(path)!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_model(spec: str) -> nn.Module:
    """Build the model named by ``spec`` (randomly initialised, in eval mode).

    Args:
        spec: ``torchvision:<name>``, ``timm:<name>`` or ``path/to/file.py:factory``.

    Returns:
        The model, in eval mode.

    Raises:
        ModelSpecError: for an unknown prefix or model, a missing file or factory, a factory
            that fails or does not return an ``nn.Module``, or timm not being installed.

    Examples:
        >>> load_model("torchvision:resnet18").__class__.__name__
        'ResNet'
        >>> load_model("torchvision:resnet19")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        erf_monitor._models.ModelSpecError: torchvision has no model 'resnet19'. Did you mean: ...
    """
    if ":" not in spec:
        raise ModelSpecError(
            f"cannot read MODEL {spec!r}: use torchvision:<name>, timm:<name> or "
            "path/to/file.py:factory"
        )
    prefix, _, rest = spec.partition(":")
    if prefix == "torchvision":
        return _torchvision(rest).eval()
    if prefix == "timm":
        return _timm(rest).eval()
    # A file spec: split at the *last* colon (the path may contain one, e.g. C:\...).
    path_text, _, factory = spec.rpartition(":")
    if path_text.endswith(".py") or "/" in path_text or "\\" in path_text:
        return _from_file(path_text, factory).eval()
    raise ModelSpecError(
        f"unknown model source {prefix!r} in {spec!r}: use torchvision:<name>, timm:<name> or "
        "path/to/file.py:factory"
    )
