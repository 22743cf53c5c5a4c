"""Turn a ``MODEL`` spec of the command line into an ``nn.Module``.

Three forms are accepted:

* ``torchvision:<name>`` — ``torchvision.models.get_model(name, weights=None)`` (random init,
  nothing is downloaded);
* ``timm:<name>`` — ``timm.create_model(name, pretrained=False)`` when timm is installed;
* ``path/to/file.py:factory`` — **runs that file** and calls ``factory()``; the only form that
  executes user code.

Weights (``pretrained``) are only ever read from local files, never downloaded: ``"cache"``
takes the copy that torchvision (``torch.hub`` cache) or timm (Hugging Face hub cache, or the
``torch.hub`` cache for older weights) keeps after a download elsewhere; a path loads a
checkpoint file (a ``state_dict`` / ``model`` entry and ``model.``/``module.``/``_orig_mod.``
key prefixes are handled). Every weight file, the caches' included, is read as data only
(:func:`read_weights`: ``.safetensors``, or ``torch.load(weights_only=True)``): a pickle that
needs code to load is refused before anything else reads it.

Every failure is a :class:`ModelSpecError` with a one-line message that says what to do.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import os
import pickle
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from erf_monitor.cli.errors import CLIError
from erf_monitor.core.imports import package_available

__all__ = [
    "ModelSpecError",
    "load_checkpoint",
    "load_model",
    "read_weights",
    "shape_mismatch",
    "spec_preprocessing",
]

_PREFIXES = ("torchvision", "timm")


class ModelSpecError(CLIError, ValueError):
    """A ``MODEL`` spec that cannot be turned into a model (bad prefix, name, file, factory)."""


def _close(name: str, choices: list[str], n: int = 5) -> str:
    matches = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not matches:
        lowered = name.lower()
        matches = [c for c in choices if lowered in c.lower()][:n]
    return f" Did you mean: {', '.join(matches)}?" if matches else ""


_NO_DOWNLOAD = "erf-monitor never downloads"


def _torchvision_weights(name: str) -> Any:
    import torchvision.models as tvm

    try:
        return tvm.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError, KeyError):
        return None


def _torchvision_pretrained(name: str) -> nn.Module:
    import torchvision.models as tvm

    weights = _torchvision_weights(name)
    if weights is None:
        raise ModelSpecError(f"torchvision has no pretrained weights for {name!r}")
    cached = (
        Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    )
    if not cached.is_file():
        raise ModelSpecError(
            f"no local copy of {weights} for torchvision:{name} (looked for {str(cached)!r}; "
            f"{_NO_DOWNLOAD}): download them once where there is internet "
            f"(torchvision.models.get_model({name!r}, weights='DEFAULT')) or pass "
            "--pretrained=PATH to a checkpoint file"
        )
    read_weights(cached)  # data only, or refused before torchvision reads it
    # The builder reads the cached file (torch.hub only downloads a missing file) and applies
    # the model's own key fixes (e.g. DenseNet's old names) and settings (Inception's input
    # transform); torch.hub would unpickle it with weights_only=False.
    with weights_only_loads():
        return tvm.get_model(name, weights=weights)


def _timm_pretrained(name: str) -> nn.Module:
    timm: Any = importlib.import_module("timm")
    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    found: str | None = None
    repo = cfg.get("hf_hub_id")
    if repo:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, filename)
            if isinstance(hit, str):
                found = hit
                break
    url = cfg.get("url")
    if found is None and url:
        legacy = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        found = str(legacy) if legacy.is_file() else None
    if found is None:
        where = f"Hugging Face hub cache of {repo!r}" if repo else "torch.hub cache"
        raise ModelSpecError(
            f"no local copy of the pretrained weights of timm:{name} (looked in the {where}; "
            f"{_NO_DOWNLOAD}): download them once where there is internet "
            f"(timm.create_model({name!r}, pretrained=True)) or pass --pretrained=PATH"
        )
    read_weights(Path(found))  # data only, or refused before timm reads it
    with weights_only_loads():  # timm's own load of the file (older versions: pickle)
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": found})


_FORCE_VARS = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside the block reads weights only, whatever its caller asks
    (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which torch reads at each load since 2.4): a second
    guard behind :func:`read_weights` for the files that torchvision and timm load
    themselves."""
    saved = {k: os.environ.pop(k, None) for k in _FORCE_VARS}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def read_weights(path: str | os.PathLike[str], mmap: bool = False) -> Any:
    """The content of a weight file, read as data only: ``.safetensors`` with safetensors,
    anything else with ``torch.load(weights_only=True)`` (tensors and plain containers),
    memory-mapped with ``mmap`` where the file's format allows it.

    Raises:
        ModelSpecError: one line: a missing file, a pickle that needs code to load (refused:
            loading it would run that code), or a file that is not readable as weights.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelSpecError(f"checkpoint {str(file)!r} does not exist")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file), device="cpu")
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            return torch.load(file, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        needs = f" ({named.group(1)})" if named else ""
        raise ModelSpecError(
            f"refusing {str(file)!r}: it is a pickle that needs code to load{needs}, and "
            "erf-monitor reads weights only (tensors and plain containers; or .safetensors)"
        ) from None
    except Exception as exc:
        raise ModelSpecError(
            f"cannot read checkpoint {str(file)!r} as weights only: {type(exc).__name__}: "
            f"{_first_line(exc)}"
        ) from None


def state_dict_of(obj: Any, path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of the state dict that a checkpoint's content ``obj`` holds: ``obj`` itself
    or its ``state_dict`` / ``model_state_dict`` / ``model`` / ``module`` entry (Lightning and
    training-script checkpoints), without non-tensor entries.

    Raises:
        ModelSpecError: one line: ``obj`` holds no tensors under any of those keys.
    """
    for key in ("state_dict", "model_state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelSpecError(
            f"{str(path)!r} holds no state dict (a mapping of parameter names to tensors, "
            "possibly under 'state_dict' or 'model')"
        )
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def shape_mismatch(
    model: nn.Module, state: Mapping[str, Any], path: str | os.PathLike[str]
) -> str | None:
    """A one-line description of the first tensor whose shape differs between ``state`` and
    ``model`` (``None``: no such tensor); when only the model's last layer differs (a
    classifier trained on another number of classes), how to build it with that head.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 1000))
        >>> other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 10))
        >>> print(shape_mismatch(net, other.state_dict(), "run.ckpt"))
        'run.ckpt' does not fit the model: 2.weight is 10x8 there but 1000x8 in the model: \
its head has 10 classes; pass --num-classes 10
    """
    own = model.state_dict()
    bad = [  # in the model's order: the first one named is the first in the model
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in own.items()
        if isinstance(state.get(k), torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not bad:
        return None
    key, theirs, ours = bad[0]
    text = (
        f"{str(path)!r} does not fit the model: {key} is {'x'.join(map(str, theirs)) or '()'} "
        f"there but {'x'.join(map(str, ours)) or '()'} in the model"
    )
    with_params = [n for n, m in model.named_modules() if any(True for _ in m.parameters(False))]
    head = with_params[-1] if with_params else None
    if head is not None and all(k.rpartition(".")[0] == head for k, _, _ in bad) and theirs:
        text += f": its head has {theirs[0]} classes; pass --num-classes {theirs[0]}"
    return text


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a checkpoint file's weights into ``model`` (data only: no code is run).

    ``.safetensors`` files are read with safetensors, anything else with
    ``torch.load(weights_only=True)``. A ``state_dict``/``model`` entry is used when present,
    and a common key prefix (``model.``, ``module.``, ``_orig_mod.``, ``net.``) is dropped
    when the keys do not match as they are.

    Raises:
        ModelSpecError: a missing or unreadable file, or weights that do not fit the model.
    """
    file = Path(path).expanduser()
    state = state_dict_of(read_weights(file), file)
    expected = set(model.state_dict())
    for prefix in ("", "model.", "module.", "_orig_mod.", "net."):
        if prefix and not all(k.startswith(prefix) for k in state):
            continue
        candidate = {k[len(prefix) :]: v for k, v in state.items()}
        if set(candidate) == expected:
            mismatch = shape_mismatch(model, candidate, file)
            if mismatch is not None:
                raise ModelSpecError(mismatch)
            try:
                model.load_state_dict(candidate)
            except RuntimeError as exc:
                raise ModelSpecError(
                    f"the weights in {str(file)!r} do not fit the model: {_first_line(exc)}"
                ) from None
            return model
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    raise ModelSpecError(
        f"the weights in {str(file)!r} do not fit the model: {len(missing)} missing "
        f"(e.g. {missing[:3]}) and {len(unexpected)} unexpected (e.g. {unexpected[:3]}) keys"
    )


def spec_preprocessing(spec: str, model: nn.Module) -> Any:
    """How images should be preprocessed for the model of ``spec`` (a ``Preprocessing``).

    torchvision models use their default weights' ``transforms()`` (available offline), timm
    models their data config, others ImageNet defaults.
    """
    from erf_monitor.inputs.images import preprocessing_for

    prefix, _, name = spec.partition(":")
    if prefix == "torchvision" and package_available("torchvision"):
        weights = _torchvision_weights(name)
        if weights is not None:
            return preprocessing_for(
                transform=weights.transforms(), source=f"torchvision weights {weights}"
            )
    return preprocessing_for(model)


def _torchvision(name: str, num_classes: int | None = None) -> nn.Module:
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
    if num_classes is None:
        return tvm.get_model(name, weights=None)
    try:
        return tvm.get_model(name, weights=None, num_classes=num_classes)
    except TypeError as exc:
        raise ModelSpecError(
            f"torchvision:{name} cannot be built with --num-classes {num_classes}: "
            f"{_first_line(exc)}"
        ) from None


def _timm(name: str, num_classes: int | None = None) -> nn.Module:
    if not package_available("timm"):
        raise ModelSpecError(f"timm:{name} needs timm, which is not installed: pip install timm")
    timm: Any = importlib.import_module("timm")
    available = list(timm.list_models())
    if name not in available:
        raise ModelSpecError(f"timm has no model {name!r}.{_close(name, available)}")
    extra = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(name, pretrained=False, **extra)


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


def load_model(
    spec: str, pretrained: str | None = None, num_classes: int | None = None
) -> nn.Module:
    """Build the model named by ``spec`` (randomly initialised unless ``pretrained``; eval mode).

    Args:
        spec: ``torchvision:<name>``, ``timm:<name>`` or ``path/to/file.py:factory``.
        pretrained: ``None`` (random init), ``"cache"`` (the library's own pretrained weights,
            from the local download cache only) or a checkpoint file path.
        num_classes: build torchvision and timm models with a head of this many classes
            (to load a checkpoint fine-tuned on another number of classes).

    Returns:
        The model, in eval mode.

    Raises:
        ModelSpecError: for an unknown prefix or model, a missing file or factory, a factory
            that fails or does not return an ``nn.Module``, timm not being installed, or
            weights that are not available locally or do not fit.

    Examples:
        >>> load_model("torchvision:resnet18").__class__.__name__
        'ResNet'
        >>> load_model("torchvision:resnet19")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        erf_monitor.cli.models.ModelSpecError: torchvision has no model 'resnet19'. ...
    """
    if ":" not in spec:
        raise ModelSpecError(
            f"cannot read MODEL {spec!r}: use torchvision:<name>, timm:<name> or "
            "path/to/file.py:factory"
        )
    prefix, _, rest = spec.partition(":")
    model: nn.Module | None = None
    if num_classes is not None and pretrained == "cache":
        raise ModelSpecError(
            "--num-classes cannot be combined with --pretrained alone (the pretrained weights "
            "come with their own head); pass --pretrained=PATH to a checkpoint with that head"
        )
    if prefix == "torchvision":
        model = _torchvision(rest, num_classes)
        if pretrained == "cache":
            model = _torchvision_pretrained(rest)
    elif prefix == "timm":
        model = _timm(rest, num_classes)
        if pretrained == "cache":
            model = _timm_pretrained(rest)
    else:
        # A file spec: split at the *last* colon (the path may contain one, e.g. C:\...).
        path_text, _, factory = spec.rpartition(":")
        if path_text.endswith(".py") or "/" in path_text or "\\" in path_text:
            if num_classes is not None:
                raise ModelSpecError(
                    "--num-classes applies to torchvision: and timm: models; "
                    f"{factory}() in {path_text!r} builds its own head"
                )
            model = _from_file(path_text, factory)
            if pretrained == "cache":
                raise ModelSpecError(
                    "--pretrained without a path needs a torchvision: or timm: model; for "
                    "a model file pass --pretrained=PATH to a checkpoint"
                )
    if model is not None:
        if pretrained not in (None, "cache"):
            load_checkpoint(model, pretrained)
        return model.eval()
    raise ModelSpecError(
        f"unknown model source {prefix!r} in {spec!r}: use torchvision:<name>, timm:<name> or "
        "path/to/file.py:factory"
    )
