"""Send ERF data to any Python function."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from erf_monitor.sinks._base import Sink

__all__ = ["CallableSink", "ERFCallback", "TextCallback"]

#: ``fn(step, scalars, images)``: ``scalars`` maps ``erf/<layer>/<metric>`` to floats,
#: ``images`` maps ``erf/<layer>/heatmap`` to ``(H, W, 3)`` uint8 arrays.
ERFCallback = Callable[[int, dict[str, float], dict[str, np.ndarray]], Any]
#: ``on_text(step, key, text)`` for texts and alerts (alerts have keys ``alerts/<title>``).
TextCallback = Callable[[int, str, str], Any]


class CallableSink(Sink):
    """Call ``fn(step, scalars, images)`` once per probe.

    Scalars and images are collected per step and delivered in one call when the sink is
    flushed (``log_results`` flushes after every probe), when data for a different step
    arrives, or on :meth:`close`. The dicts are fresh copies; the images are uint8
    ``(H, W, 3)`` arrays. Raw maps are passed to ``on_arrays(step, key, arrays)`` and
    texts/alerts to ``on_text(step, key, text)`` if given, else dropped.

    Args:
        fn: ``fn(step: int, scalars: dict[str, float], images: dict[str, np.ndarray])``.
        on_text: optional ``on_text(step: int, key: str, text: str)``.
        on_arrays: optional ``on_arrays(step: int, key: str, arrays: dict[str, np.ndarray])``.

    Examples:
        >>> seen = []
        >>> sink = CallableSink(lambda step, scalars, images: seen.append((step, scalars)))
        >>> sink.log_scalars({"erf/layer1/coverage": 0.5}, step=3)
        >>> sink.flush()
        >>> seen
        [(3, {'erf/layer1/coverage': 0.5})]
    """

    def __init__(
        self,
        fn: ERFCallback,
        *,
        on_text: TextCallback | None = None,
        on_arrays: Callable[[int, str, dict[str, np.ndarray]], Any] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"CallableSink needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.on_text = on_text
        self.on_arrays = on_arrays
        self._step: int | None = None
        self._scalars: dict[str, float] = {}
        self._images: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"CallableSink({getattr(self.fn, '__qualname__', self.fn)!r})"

    def _at(self, step: int) -> None:
        if self._step is not None and self._step != step:
            self.flush()
        self._step = int(step)

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Collect scalars for ``step``."""
        self._at(step)
        self._scalars.update({k: float(v) for k, v in scalars.items()})

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """Collect an image for ``step``."""
        self._at(step)
        self._images[key] = image

    def log_text(self, key: str, text: str, step: int) -> None:
        """Forward to ``on_text`` right away, if given."""
        if self.on_text is not None:
            self.on_text(int(step), key, text)

    def log_arrays(self, key: str, arrays: Mapping[str, np.ndarray], step: int) -> None:
        """Forward to ``on_arrays`` right away, if given."""
        if self.on_arrays is not None:
            self.on_arrays(int(step), key, dict(arrays))

    def flush(self) -> None:
        """Deliver what was collected (nothing if nothing was)."""
        step, scalars, images = self._step, self._scalars, self._images
        self._step, self._scalars, self._images = None, {}, {}
        if step is not None and (scalars or images):
            self.fn(step, scalars, images)

    def close(self) -> None:
        """Deliver what is pending."""
        self.flush()
