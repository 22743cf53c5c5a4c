"""What one monitor probe did (shared by the engine and its all-ranks probe)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from erf_monitor.measure.result import ERFResults

__all__ = ["ProbeOutcome"]


@dataclass
class ProbeOutcome:
    """What one probe did: its results (``None`` if skipped) and the alerts it fired."""

    step: int
    results: ERFResults | None = None
    seconds: float = math.nan
    alerts: list[str] = field(default_factory=list)
