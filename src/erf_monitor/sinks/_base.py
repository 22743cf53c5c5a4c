"""The one small interface every logging backend implements."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["Sink"]


class Sink:
    """Where ERF probes go. Subclasses override what their backend supports.

    Keys are ``erf/<layer>/<metric>`` for scalars and ``erf/<layer>/heatmap`` for images, the
    same on every backend; ``step`` is the trainer's ``global_step`` (or the watcher's count).
    """

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Log scalar metrics ``{key: value}`` at ``step``."""

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """Log an ``(H, W, 3)`` uint8 RGB image at ``step``."""

    def log_text(self, key: str, text: str, step: int) -> None:
        """Log a short text (alerts, summaries) at ``step``."""

    def log_arrays(self, key: str, arrays: Mapping[str, np.ndarray], step: int) -> None:
        """Keep raw arrays (ERF maps) for later analysis; backends without files ignore it."""

    def alert(self, title: str, text: str, step: int) -> None:
        """Raise a user-visible alert (W&B alert); by default logged as text."""
        self.log_text(f"alerts/{title}", text, step)

    def flush(self) -> None:
        """Push buffered data to disk/server."""

    def close(self) -> None:
        """Release resources the sink opened itself (never the user's writer or run)."""
