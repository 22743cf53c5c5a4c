"""``erf-monitor analyze`` over several models and several processes.

* **Several models**: one folder per model (named from ``--names`` or the model spec), each
  with what a single-model run writes; ``metrics.json`` is written last and atomically, so a
  folder that has one is finished. ``--skip-existing`` skips those (a resumed batch), after
  checking that they were made with the same settings.
* **Several processes**: under ``torchrun --nproc_per_node N`` the process group is set up
  from torchrun's environment (gloo on CPU, NCCL on CUDA, each rank on its own GPU), the
  probe images are sharded over the ranks (:mod:`erf_monitor.probe.sharded`) and rank 0
  alone writes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from erf_monitor.cli.errors import CLIError

__all__ = [
    "BatchError",
    "finished",
    "folder_names",
    "panels",
    "settings_diff",
    "setup_distributed",
    "teardown_distributed",
    "write_json",
]


class BatchError(CLIError, ValueError):
    """A batch that cannot go on as asked (one line, no traceback in the CLI)."""


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """``"key old -> new, ..."`` for every setting that differs (sorted by key)."""
    return ", ".join(
        f"{k} {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    )


def folder_names(names: Sequence[str]) -> dict[str, str]:
    """A folder name for every model name: letters, digits and ``. _ -`` kept, every other
    run of characters one ``_`` (``torchvision:resnet18`` -> ``torchvision_resnet18``).

    Raises:
        BatchError: two names give the same folder.

    Examples:
        >>> folder_names(["torchvision:resnet18", "ResNet-50 (ours)"])
        {'torchvision:resnet18': 'torchvision_resnet18', 'ResNet-50 (ours)': 'ResNet-50_ours'}
    """
    out: dict[str, str] = {}
    for name in names:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
        if slug in out.values():
            raise BatchError(
                f"models {name!r} and {next(k for k, v in out.items() if v == slug)!r} would "
                f"share the folder {slug!r}; give them distinct --names"
            )
        out[name] = slug
    return out


def write_json(path: Path, record: Mapping[str, Any]) -> None:
    """Write ``record`` as JSON through a temporary file and a rename: the file is either
    absent or whole (an interrupted batch never leaves a half-written ``metrics.json``)."""
    from erf_monitor.core.files import replaced

    with replaced(path) as tmp:  # a failed write leaves no temporary file either
        tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")


def finished(folder: Path, request: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record of a finished run in ``folder`` made with the same ``request``, or ``None``
    when there is none.

    Raises:
        BatchError: the folder holds a finished run made with other settings.
    """
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable: not finished, measured again
    before = record.get("request") if isinstance(record, dict) else None
    if before != dict(request):
        diff = settings_diff(before if isinstance(before, dict) else {}, request)
        raise BatchError(
            f"--skip-existing: {str(folder)!r} holds a run made with other settings ({diff}); "
            "delete that folder or write to another --out"
        )
    return record


def panels(folder: Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """``{layer: Panel}`` of a finished run's 2-D centre maps, read back from its files."""
    import numpy as np

    from erf_monitor.viz.grid import Panel

    out: dict[str, Any] = {}
    with np.load(folder / "maps.npz", allow_pickle=False) as maps:
        for layer, rec in record.get("layers", {}).items():
            if layer not in maps.files or maps[layer].ndim != 2:
                continue
            size = rec.get("metrics", {}).get("erf_size")
            out[layer] = Panel(
                heatmap=np.asarray(maps[layer], dtype=np.float64),
                layer=layer,
                output_shape=tuple(rec.get("output_shape", ())),
                erf_size=None if size is None else int(size),
                centre_pixel=tuple(rec.get("centre_pixel", ())) or None,
                mode=str(record.get("mode", "")),
            )
    return out


def setup_distributed(device: str) -> tuple[bool, str]:
    """Join torchrun's process group when launched by it (``WORLD_SIZE`` > 1).

    Returns:
        ``(started, device)``: whether this call started the group (and must end it), and the
        device this rank probes on (``cuda`` becomes ``cuda:<LOCAL_RANK>``).
    """
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return False, device
    cuda = device.startswith("cuda")
    if cuda:
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True, device


def teardown_distributed(started: bool) -> None:
    if started:
        import torch.distributed as dist

        dist.destroy_process_group()
