"""Which of a result's metrics are logged: a small default set per layer, the rest on request.

``ERFResult.scalars()`` has about 40 metrics per layer; a dashboard with all of them buries
the few that matter. :func:`pick_metrics` is the one place that chooses what a probe logs
(``MonitorOptions.metrics``); only what is logged is computed (plus the cheap numbers the
monitor's history keeps).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Literal

from erf_monitor.measure.result import METRIC_NAMES, PER_AXIS

__all__ = [
    "DEFAULT_METRICS",
    "METRIC_NAMES",
    "MetricSelection",
    "check_metrics",
    "metric_patterns",
    "pick_metrics",
]

#: ``None`` (the default set), ``"all"``, or metric names (globs allowed).
MetricSelection = Sequence[str] | Literal["all"] | None

#: Logged per layer unless ``metrics=`` says otherwise: the numbers the README and the
#: concepts page explain (8 in 2-D; ``border_ratio`` only exists with a set of positions).
DEFAULT_METRICS: tuple[str, ...] = (
    "erf_size",
    "coverage",
    "erf_trf_ratio",
    "area_t50",
    "sigma",
    "centroid_offset",
    "border_ratio",
)

_AXIS = re.compile(r"[xyz]|d\d+")


def _selects(name: str, key: str) -> bool:
    """Whether the requested ``name`` (a metric, a per-axis base name or a glob) selects ``key``."""
    if key == name or fnmatchcase(key, name):
        return True
    head, _, axis = key.rpartition("_")
    return name in PER_AXIS and head == name and _AXIS.fullmatch(axis) is not None


def check_metrics(metrics: MetricSelection) -> tuple[str, ...] | Literal["all"] | None:
    """Validate a ``metrics=`` value; returns it normalised (a tuple of names).

    Raises:
        TypeError: for anything but ``None``, ``"all"`` or a sequence of strings.
        ValueError: for a name (or glob) that selects no metric, listing the valid names.
    """
    if metrics is None or metrics == "all":
        return metrics
    if isinstance(metrics, str) or not isinstance(metrics, Sequence):
        raise TypeError(
            f"metrics must be a list of metric names or 'all', got {metrics!r} "
            "(a single name: metrics=[name])"
        )
    names = tuple(metrics)
    examples = [*METRIC_NAMES, *(f"{b}_{a}" for b in PER_AXIS for a in ("z", "y", "x"))]
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"metrics must be strings, got {name!r}")
        if not any(_selects(name, key) for key in examples):
            raise ValueError(
                f"metrics: {name!r} names no metric; valid names (globs allowed, per-axis "
                f"ones by their base name): {', '.join(METRIC_NAMES)}"
            )
    return names


def pick_metrics(values: Mapping[str, float], metrics: MetricSelection = None) -> dict[str, float]:
    """The entries of one result's ``scalars()`` that a probe logs.

    Args:
        values: ``{metric: value}`` of one result (``ERFResult.scalars()``).
        metrics: ``None`` for :data:`DEFAULT_METRICS`, ``"all"``, or names: a metric
            (``"gaussian_r2"``), a per-axis base name (``"sigma"``: ``sigma_y``,
            ``sigma_x``) or a glob (``"area_t*"``).

    Returns:
        The selected entries, in the order of ``values``.

    Examples:
        >>> pick_metrics({"coverage": 0.5, "sigma_y": 2.0, "sigma_x": 3.0, "anisotropy": 1.5})
        {'coverage': 0.5, 'sigma_y': 2.0, 'sigma_x': 3.0}
        >>> pick_metrics({"area_t20": 0.1, "area_t50": 0.3, "coverage": 0.5}, ["area_t*"])
        {'area_t20': 0.1, 'area_t50': 0.3}
    """
    if metrics == "all":
        return dict(values)
    names = DEFAULT_METRICS if metrics is None else tuple(metrics)
    return {k: v for k, v in values.items() if any(_selects(n, k) for n in names)}


def metric_patterns(metrics: MetricSelection = None) -> list[str] | None:
    """The names to ask ``ERFResult.scalars(names)`` for, so that only the selected metrics
    are computed (``None``: every one, for ``"all"``); per-axis base names become one pattern
    per axis (``"sigma"``: ``"sigma_?"``).

    Examples:
        >>> metric_patterns(["sigma", "area_t*"])
        ['sigma_?', 'area_t*']
    """
    if metrics == "all":
        return None
    names = DEFAULT_METRICS if metrics is None else tuple(metrics)
    return [f"{n}_?" if n in PER_AXIS else n for n in names]
