"""One forward with a hook on each target layer: the single mechanism that reads layer outputs.

The targets stage observes output shapes with it, ``layers="auto"`` describes every module's
first call with it, the numeric TRF method captures its surrogate's outputs with it and the
probe captures its seed units with it. Each target's *first* output (with its output
selector applied) is handed to ``take`` inside the hook, before anything later in the
forward can modify it in place; once every target has produced its output the forward is
aborted (nothing deeper runs). Hooks are always removed, also when the model raises, and act
only in the calling thread; the forward runs with
:func:`~erf_monitor.core.probing.is_probing` true.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from erf_monitor.core.errors import ERFProbeError
from erf_monitor.core.hints import forward_error, is_own_error
from erf_monitor.core.probing import StopForward, probing, this_thread_only
from erf_monitor.targets.layers import Selector
from erf_monitor.targets.outputs import select_output

__all__ = ["ForwardFn", "StopForward", "default_forward", "hooked_forward", "not_reached_error"]

ForwardFn = Callable[[nn.Module, torch.Tensor], Any]


def default_forward(model: nn.Module, x: torch.Tensor) -> Any:
    return model(x)


def not_reached_error(names: Sequence[str]) -> ValueError:
    return ValueError(
        f"Layer(s) {list(names)} exist but are never called during the forward pass, so they "
        "have no ERF on this input. Check forward_fn (how the model is called) and that the "
        "layer is used by forward()."
    )


def hooked_forward(
    net: nn.Module,
    forward_fn: ForwardFn | None,
    x: torch.Tensor,
    located: Mapping[str, tuple[nn.Module, Selector]],
    take: Callable[..., None],
    *,
    what: str = "probe input",
    with_args: bool = False,
    stop_after: Collection[str] | None = None,
    require_all: bool = True,
    copy_input: bool = True,
) -> dict[str, int]:
    """Run ``forward_fn(net, x.clone())`` with a hook on every target; return call counts.

    ``located`` maps each target's spec to its module and output selector. ``take(spec,
    output)`` (``take(spec, output, args)`` ``with_args``) receives the selected first output
    of each target inside its hook; an exception it raises is re-raised after the forward
    (the model may catch exceptions itself). The model runs on a copy of ``x``, so an
    in-place operation on its input changes neither ``x`` nor a gradient w.r.t. ``x``
    (``copy_input=False``: on ``x`` itself, for a caller that made the copy and compares
    tensors with it). ``what`` names ``x`` in the error of a failing forward.

    The forward stops once every target of ``stop_after`` (default: every target; empty:
    never) has produced its first output. ``require_all=False`` accepts targets the forward
    never calls (their count is 0).

    Raises:
        ERFProbeError: the model's forward failed (one line, with what to do).
        ValueError: a target was never called (with ``require_all``).
    """
    calls = dict.fromkeys(located, 0)
    errors: dict[str, Exception] = {}
    pending = set(located if stop_after is None else stop_after)
    stops = bool(pending)
    handles = []

    def make_hook(spec: str, selector: Selector) -> Callable[..., None]:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            calls[spec] += 1
            if calls[spec] > 1:
                return
            try:
                part = select_output(out, selector, spec)
                take(spec, part, _inp) if with_args else take(spec, part)
            except Exception as exc:  # raised after the forward: the model may catch it
                errors[spec] = exc
            pending.discard(spec)
            if stops and not pending:
                raise StopForward

        return hook

    try:
        for spec, (module, selector) in located.items():
            # Only this thread's forward: another thread running the model meanwhile is
            # neither read nor stopped.
            handles.append(
                module.register_forward_hook(this_thread_only(make_hook(spec, selector)))
            )
        with probing(), contextlib.suppress(StopForward):
            (forward_fn or default_forward)(net, x.clone() if copy_input else x)
    except ERFProbeError:
        raise
    except Exception as exc:  # the user's model failed: say so, with the input shape
        if is_own_error(exc):  # e.g. an output selector that matches nothing
            raise
        raise forward_error(exc, x, what=what) from None
    finally:
        for h in handles:
            h.remove()
    for spec in located:
        if spec in errors:
            raise errors[spec]
    missing = [s for s in located if calls[s] == 0]
    if missing and require_all:
        raise not_reached_error(missing)
    return calls
