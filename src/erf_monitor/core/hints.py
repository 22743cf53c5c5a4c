"""One-line errors that say what to do, for the ways a user's model can defeat a probe.

* A forward that fails before any of the model's layers ran (it wants a dict, a list or
  several arguments): suggest ``forward_fn``.
* ``torch.utils.checkpoint(..., use_reentrant=True)``: its backward refuses
  ``torch.autograd.grad(..., inputs)``, which the probe needs; say ``use_reentrant=False``.
* Parameters on the ``meta`` device (``init_empty_weights``, ``device_map="meta"``): no values.

:func:`check_not_meta` runs first in the public entry points, :func:`input_grad` replaces
``torch.autograd.grad`` where the probe and the numeric TRF differentiate, and
:func:`forward_error` builds the error for a failed forward (the probe, the auto layer pass,
the TRF's numeric method).
"""

from __future__ import annotations

import logging
import os
import traceback
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from erf_monitor.core.errors import ERFProbeError
from erf_monitor.core.index import ModelIndex, index_of

__all__ = ["ForwardError", "check_not_meta", "forward_error", "input_grad", "is_own_error"]

#: The erf_monitor package folder (this module sits in its ``core`` subpackage).
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("erf_monitor")


class ForwardError(ERFProbeError, ValueError):
    """The model's forward raised on the probe input (an ``ERFProbeError`` and a ``ValueError``,
    so that both the probe's and the TRF analysis' documented errors catch it)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else ""


def _module_frames(tb: TracebackType | None) -> int:
    """How many ``nn.Module.forward`` frames the traceback passes through."""
    count = 0
    for frame, _ in traceback.walk_tb(tb):
        if frame.f_code.co_name == "forward" and isinstance(frame.f_locals.get("self"), nn.Module):
            count += 1
    return count


def is_own_error(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by erf-monitor's own code (e.g. a selector in a hook)."""
    frames = list(traceback.walk_tb(exc.__traceback__))
    if not frames:
        return False
    filename = os.path.abspath(frames[-1][0].f_code.co_filename)
    return filename.startswith(_PACKAGE_DIR + os.sep)


def forward_error(exc: BaseException, x: Tensor, *, what: str = "probe input") -> ForwardError:
    """The one-line error for a forward that raised ``exc`` on ``x``, with what to do.

    Raise it ``from None``: the model's own traceback goes to the ``erf_monitor`` logger at
    DEBUG level (``logging.getLogger("erf_monitor").setLevel("DEBUG")`` to see it).
    """
    log.debug("the model's forward raised", exc_info=exc)
    name = type(exc).__name__
    msg = _first_line(exc)
    shape = tuple(x.shape)
    low = msg.lower()
    if _module_frames(exc.__traceback__) <= 1:
        # It failed in the top-level forward (or in forward_fn) before any layer ran: most
        # often a forward that wants a dict, a list or several arguments.
        return ForwardError(
            f"The model's forward failed on the {what} (a tensor of shape {shape}) before any "
            f"of its layers ran ({name}: {msg}). If forward() does not take the image tensor "
            "itself (a dict, a list, several arguments), pass forward_fn, e.g. "
            "forward_fn=lambda model, x: model({'image': x})."
        )
    hint = ""
    if "kernel size" in low or "output size is too small" in low or "input size" in low:
        hint = " The probe input looks smaller than a kernel: use a larger input."
    elif ("should be the same" in low and "type" in low) or "expected scalar type" in low:
        hint = (
            f" The probe input is {str(x.dtype).replace('torch.', '')}: compute_erf's dtype "
            "casts the inputs only, so pass the model's own dtype (or none), or cast the "
            "model (e.g. model.double())."
        )
    return ForwardError(
        f"The model's forward failed on the {what} of shape {shape}: {name}: {msg}.{hint}"
    )


def _translate(exc: RuntimeError) -> Exception | None:
    text = str(exc)
    if "use_reentrant" in text:
        return ERFProbeError(
            "The model uses torch.utils.checkpoint(..., use_reentrant=True), whose backward "
            "refuses torch.autograd.grad(outputs, inputs), which the probe needs (it never "
            "touches .grad). Pass use_reentrant=False to checkpoint (PyTorch's recommendation), "
            "or probe a copy of the model without checkpointing."
        )
    if "meta tensor" in text or "on meta tensors" in text:
        return _meta_error()
    return None


def _meta_error() -> ValueError:
    return ValueError(
        "The model has parameters or buffers on the 'meta' device (built under "
        "torch.device('meta'), init_empty_weights or device_map='meta'): they hold no values, "
        "so there is no ERF to measure. Materialise the weights first, e.g. "
        "model.to_empty(device='cpu') then load_state_dict(...)."
    )


def check_not_meta(model: nn.Module | ModelIndex, inputs: Any = None) -> None:
    """Refuse a model (or inputs) on the ``meta`` device with a one-line ``ValueError``
    (``model`` may be an index of the model)."""
    index = index_of(model)
    if any(t.is_meta for t in (*index.parameters, *index.buffers)):
        raise _meta_error()
    if isinstance(inputs, Tensor) and inputs.is_meta:
        raise ValueError(
            "The probe inputs are on the 'meta' device: they hold no values. Pass real images."
        )


def input_grad(outputs: Tensor, inputs: Tensor, **kwargs: Any) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, **kwargs)`` with torch's known refusals made plain
    (reentrant checkpointing, meta tensors)."""
    try:
        return torch.autograd.grad(outputs, inputs, **kwargs)
    except RuntimeError as exc:
        plain = _translate(exc)
        if plain is None:
            raise
        raise plain from None
