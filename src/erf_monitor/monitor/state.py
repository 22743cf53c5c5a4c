"""The monitor's checkpointed state: reading back what
:meth:`~erf_monitor.monitor.engine.MonitorEngine.state_dict` wrote (tensors and Python
scalars only, loadable with ``torch.load(weights_only=True)``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["STATE_VERSION", "first_line", "read_state"]

#: The version of the state this library writes (and the newest it reads).
STATE_VERSION = 1


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (``"no details"`` for none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


def read_state(state: Any) -> dict[str, Any]:
    """The engine attributes that ``state`` holds, converted and checked; raises for state
    this version cannot read."""
    if not isinstance(state, Mapping):
        raise TypeError(f"a {type(state).__name__}, not a mapping")
    version = int(state.get("version", STATE_VERSION))
    if version > STATE_VERSION:
        raise ValueError(
            f"written by a newer erf-monitor: state version {version}, this one reads up to "
            f"{STATE_VERSION}"
        )
    batch = state.get("probe_batch")
    if batch is not None:
        if not isinstance(batch, torch.Tensor) or not batch.is_floating_point() or batch.ndim < 3:
            raise TypeError("the probe batch is not a floating-point image tensor")
        batch = batch.detach().to("cpu", copy=True)
    last = state.get("last_probe_step")
    return {
        "probe_batch": batch,
        "history": {
            str(n): {int(s): {str(k): float(x) for k, x in v.items()} for s, v in h.items()}
            for n, h in state.get("history", {}).items()
        },
        "probe_times": {int(s): float(t) for s, t in state.get("probe_times", {}).items()},
        "last_probe_step": None if last is None else int(last),
        "below": {str(k): int(v) for k, v in state.get("below", {}).items()},
        "alerted": {str(k): int(v) for k, v in state.get("alerted", {}).items()},
    }
