"""The CLI's one error type: every command's usage error derives from :class:`CLIError`, which
``erf-monitor`` prints as one line on stderr (exit code 2); and how other errors are told in
that one line."""

from __future__ import annotations

__all__ = ["CLIError", "one_line", "short_error"]


class CLIError(Exception):
    """A usage error: printed as one line on stderr, exit code 2."""


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def short_error(exc: BaseException, spec: str) -> str:
    """One short line; an unknown layer's close matches, and the full list behind a hint."""
    from erf_monitor.targets.layers import UnknownLayerError

    if isinstance(exc, UnknownLayerError):
        close = f" (did you mean {', '.join(map(repr, exc.close[:3]))}?)" if exc.close else ""
        every = ", ".join(exc.names)
        if len(every) <= 60:  # a small model: its layers fit on the line
            return f"unknown layer {exc.layer!r}{close}; its layers: {every}"
        return f"unknown layer {exc.layer!r}{close}; list the layers: erf-monitor layers {spec}"
    return one_line(exc)
