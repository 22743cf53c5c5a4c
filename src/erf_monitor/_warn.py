"""Warnings attributed to the user's own line of code.

A warning raised inside a training framework's hook would otherwise point at erf-monitor's
or Lightning's source (``_monitor.py:490``), which tells the user nothing. :func:`warn`
walks up the stack to the first frame outside erf-monitor and the training frameworks (the
``trainer.fit(...)`` or ``optimizer.step()`` line of the user's script) and reports the
warning there, with that module's registry, so that the usual filters and "once per
location" rules apply as for any warning.
"""

from __future__ import annotations

import sys
import warnings
from types import FrameType

__all__ = ["FRAMEWORK_PACKAGES", "reissue", "user_frame", "warn"]

#: Top-level packages whose frames are never the user's call site.
FRAMEWORK_PACKAGES: tuple[str, ...] = (
    "erf_monitor",
    "lightning",
    "lightning_fabric",
    "pytorch_lightning",
    "torch",
    "transformers",
    "accelerate",
    "contextlib",
)


def _is_framework(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in FRAMEWORK_PACKAGES)


def user_frame() -> FrameType | None:
    """The innermost frame outside :data:`FRAMEWORK_PACKAGES`, or ``None``."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if not _is_framework(str(frame.f_globals.get("__name__", ""))):
            return frame
        frame = frame.f_back
    return None


def warn(message: str | Warning, category: type[Warning]) -> None:
    """``warnings.warn`` at the user's call site (see the module docstring)."""
    frame = user_frame()
    if frame is None:  # called from framework code only (e.g. a worker thread)
        warnings.warn(message, category, stacklevel=2)
        return
    module_globals = frame.f_globals
    warnings.warn_explicit(
        message,
        category,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=str(module_globals.get("__name__", "")),
        registry=module_globals.setdefault("__warningregistry__", {}),
        module_globals=module_globals,
    )


def reissue(caught: list[warnings.WarningMessage]) -> None:
    """Issue warnings recorded by ``warnings.catch_warnings(record=True)`` again, each at the
    user's call site."""
    for w in caught:
        warn(w.message, w.category)
