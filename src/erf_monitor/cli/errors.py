"""The CLI's one error type: every command's usage error derives from :class:`CLIError`, which
``erf-monitor`` prints as one line on stderr (exit code 2)."""

from __future__ import annotations

__all__ = ["CLIError"]


class CLIError(Exception):
    """A usage error: printed as one line on stderr, exit code 2."""
