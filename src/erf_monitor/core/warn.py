"""Warnings attributed to the user's own line of code.

A warning raised inside a training framework's hook would otherwise point at erf-monitor's
or Lightning's source (``_monitor.py:490``), which tells the user nothing. :func:`warn`
walks up the stack to the first frame outside erf-monitor and the training frameworks (the
``trainer.fit(...)`` or ``optimizer.step()`` line of the user's script) and reports the
warning there through ``warnings.warn(stacklevel=...)``, so that the usual filters and
"once per location" rules apply as for any warning.

Only ``warnings.warn`` with a stack level is used: ``warnings.warn_explicit(module_globals=)``
asks the frame's loader for source lines, and a ``__main__`` run by ``python -c``, from stdin
or by ``exec`` has a loader that raises (``ImportError: '__main__' is not a built-in
module``), which would end the user's training run at the first alert.

A *failure* warning (``failure=True``: the monitor failed and says that training goes on)
never raises: when the user's filters turn it into an error (``python -W error``, pytest's
``filterwarnings = error``), raising it would end the training run that its own text promises
goes on. It is logged on the ``erf_monitor`` logger at ``ERROR`` level instead (Python's last
resort handler prints it on stderr when no logging is configured). ``strict=True`` is how to
make a monitor failure end training. Other warnings (coverage alerts, diagnostics) follow the
filters as any warning does.
"""

from __future__ import annotations

import logging
import sys
import warnings
from types import FrameType

__all__ = ["FRAMEWORK_PACKAGES", "reissue", "user_stacklevel", "warn"]

_log = logging.getLogger("erf_monitor")

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

#: Frames ``warnings.warn`` itself skips when counting a stack level above 1 (CPython's
#: ``_is_internal_frame``): they must not be counted here either.
_SKIPPED_BY_WARNINGS = ("importlib", "_bootstrap")


def _is_framework(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in FRAMEWORK_PACKAGES)


def _skipped_by_warnings(filename: str) -> bool:
    return all(part in filename for part in _SKIPPED_BY_WARNINGS)


def user_stacklevel() -> int | None:
    """The ``stacklevel`` that makes ``warnings.warn``, called by the caller of this function,
    report at the innermost frame outside :data:`FRAMEWORK_PACKAGES`; ``None`` when every
    frame belongs to a framework (e.g. a worker thread)."""
    frame: FrameType | None = sys._getframe(1)  # the frame that will call warnings.warn
    level = 1
    while frame is not None:
        if not _is_framework(str(frame.f_globals.get("__name__", ""))):
            return level
        frame = frame.f_back
        while frame is not None and _skipped_by_warnings(frame.f_code.co_filename):
            frame = frame.f_back
        level += 1
    return None


def warn(message: str | Warning, category: type[Warning], *, failure: bool = False) -> None:
    """``warnings.warn`` at the user's call site (see the module docstring).

    Never raises, except what the user's own warning filters ask for (``"error"``) and only
    when ``failure`` is false: a failure warning turned into an error is logged instead.
    """
    try:
        level = user_stacklevel() or 1
    except Exception:  # a frame walk cannot be expected to fail; a warning must not
        level = 1
    try:
        warnings.warn(message, category, stacklevel=level)
    except category:
        if not failure:
            raise  # the user's filters turned this warning into an error: their choice
        _log.error(
            "%s: %s\n(The warnings filter turns this warning into an error; a monitor "
            "failure never ends training unless strict=True, so it is logged instead.)",
            category.__name__,
            message,
        )
    except Exception as err:  # the warning machinery failed: say it on the log instead
        _log.warning("%s: %s (could not be issued: %s)", category.__name__, message, err)


def reissue(caught: list[warnings.WarningMessage]) -> None:
    """Issue warnings recorded by ``warnings.catch_warnings(record=True)`` again, each at the
    user's call site."""
    for w in caught:
        warn(w.message, w.category)
