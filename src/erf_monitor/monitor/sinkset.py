"""The monitor's sinks: one fan-out whose sink failures are reported once and remembered.

:class:`~erf_monitor.sinks.MultiSink` reports a failing sink once and goes on; the monitor's
``strict`` option wants such a failure raised instead, after the other sinks got their data.
Each sink is wrapped in a recorder that remembers its exceptions, and
:meth:`SinkSet.raise_errors` re-raises the first one when ``strict``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from erf_monitor.sinks import MultiSink, Sink

__all__ = ["SinkSet"]


class _Recorder(Sink):
    """Forwards to a sink and remembers its exceptions (so that ``strict`` can re-raise them
    after :class:`MultiSink` has reported them once)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.errors: list[Exception] = []

    def __repr__(self) -> str:
        return repr(self.sink)

    def _call(self, method: str, *args: Any) -> None:
        try:
            getattr(self.sink, method)(*args)
        except Exception as exc:
            self.errors.append(exc)
            raise

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        self._call("log_scalars", scalars, step)

    def log_image(self, key: str, image: Any, step: int) -> None:
        self._call("log_image", key, image, step)

    def log_text(self, key: str, text: str, step: int) -> None:
        self._call("log_text", key, text, step)

    def log_arrays(self, key: str, arrays: Mapping[str, Any], step: int) -> None:
        self._call("log_arrays", key, arrays, step)

    def alert(self, title: str, text: str, step: int) -> None:
        self._call("alert", title, text, step)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")


class SinkSet(MultiSink):
    """Every sink of a monitor behind one :class:`~erf_monitor.sinks.Sink`; a failing sink is
    reported once (never raises) and its error kept for :meth:`raise_errors`."""

    def __init__(self, sinks: Sequence[Sink] = ()) -> None:
        self._recorders = [_Recorder(s) for s in sinks]
        super().__init__(self._recorders)

    def raise_errors(self, strict: bool) -> None:
        """Forget the errors remembered so far; with ``strict`` re-raise the first one of the
        first sink that failed."""
        for rec in self._recorders:
            if rec.errors:
                exc = rec.errors[0]
                rec.errors.clear()
                if strict:
                    raise exc

    def flush_checked(self, strict: bool) -> None:
        """Flush every sink, then :meth:`raise_errors`."""
        self.flush()
        self.raise_errors(strict)

    def close_checked(self, strict: bool) -> None:
        """Flush and close every sink (sinks never close a user's writer or run), then
        :meth:`raise_errors`."""
        self.flush()
        self.close()
        self.raise_errors(strict)
