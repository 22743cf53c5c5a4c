"""Taking the probe batch where it flows past: a forward pre-hook that copies, and nothing more.

The hook never probes (probes run at step boundaries, outside the user's forward calls) and
never removes itself (a hook removed during a forward can break the hooks torch calls after
it, e.g. another monitor's): the owner removes it at a step boundary once :attr:`done`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from erf_monitor.core.probing import is_probing

if TYPE_CHECKING:
    from erf_monitor.monitor.engine import MonitorEngine

__all__ = ["BatchCapture"]


class BatchCapture:
    """Captures the probe batch of ``engine`` from the forwards of ``model``.

    Forwards run by erf-monitor itself (any probe's or trace's, :func:`is_probing`) are
    ignored. A batch with NaN or Inf values is not taken; the next forward's is.

    Attributes:
        seen: a forward of the user's went past (whether or not its batch was taken).
        done: the batch was taken, or could not be (reported once): nothing more to do.
    """

    def __init__(self, engine: MonitorEngine, model: nn.Module) -> None:
        self.engine = engine
        self.seen = False
        self.done = False

        def hook(_module: nn.Module, args: Any, kwargs: Any = None) -> None:
            # A plain function, not a bound method: deep copies of the model (the numeric
            # TRF's surrogate) share it instead of copying this object and its engine.
            if not self.done and not is_probing():
                self._take(args, kwargs or {})

        self._handle: Any = model.register_forward_pre_hook(hook, with_kwargs=True)

    def _take(self, args: Any, kwargs: dict[str, Any]) -> None:
        self.seen = True
        batch = args[0] if len(args) == 1 else (args if args else kwargs)
        try:
            self.done = self.engine.capture(batch)
        except Exception as exc:
            self.done = True
            self.engine.report("capture", f"the probe batch could not be captured: {exc}", exc)

    def remove(self) -> None:
        """Remove the hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
