"""The few exception and warning types of erf-monitor."""

from __future__ import annotations

__all__ = ["ERFCoverageWarning", "ERFInputWarning", "ERFProbeError", "ERFProbeWarning"]


class ERFProbeError(RuntimeError):
    """The probe could not produce a trustworthy ERF map (NaN/Inf gradients, a failing forward).

    Bad arguments (unknown layer, input without spatial dims) raise plain ``ValueError`` /
    ``TypeError`` instead.
    """


class ERFProbeWarning(UserWarning):
    """Something about a probe deserves attention but did not stop it (e.g. an all-zero map)."""


class ERFCoverageWarning(UserWarning):
    """A watched layer's ERF covers less of the input than ``min_coverage``."""


class ERFInputWarning(ERFProbeWarning):
    """The probe input is too small for a layer asked for (its output has one unit along a
    dim), or ``layers="auto"`` dropped stages for that reason. ``strict`` monitors raise it."""
