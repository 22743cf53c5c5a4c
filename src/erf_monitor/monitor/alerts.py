"""The coverage alert: when a checked layer's ERF is judged too small, and what the alert says.

An ERF at initialisation is small and training grows it, so a coverage below ``min_coverage``
at one probe is no reason to alarm anybody. :class:`AlertPolicy` decides, from a layer's
coverage at every probe so far:

* **at once** when the layer's clipped TRF itself covers less than the threshold: no
  training can fix that (reason ``"trf"``);
* **during training** only once the ERF has had its chance: at least ``patience``
  consecutive probes below the threshold, at or after step ``warmup_steps``, and a trend
  that will not get there (a straight line through those probes, carried forward by as
  many steps again as were trained since the first probe, stays below; reason ``"stalled"``);
* **at the end of training** whenever the last probe is below the threshold (reason
  ``"end"``): the final decision, made after the final probe.

The policy is a plain object working on ``(step, coverage)`` points, so a finished run's
history can be judged with it too (:func:`replay_alerts`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from erf_monitor.core import warn as _warn
from erf_monitor.core.errors import ERFCoverageWarning

if TYPE_CHECKING:
    from erf_monitor.measure.result import ERFResult
    from erf_monitor.sinks import Sink

__all__ = [
    "DEFAULT_PATIENCE",
    "DEFAULT_WARMUP_STEPS",
    "AlertPolicy",
    "CoverageAlerts",
    "Reason",
    "alert_message",
    "best_coverage",
    "fmt_shape",
    "replay_alerts",
]

#: Probes below the threshold (the step-0 probe included) before a mid-training alert.
DEFAULT_PATIENCE = 3
#: No mid-training alert for a layer that training can still grow before this step.
DEFAULT_WARMUP_STEPS = 1000

#: Why an alert fired: the TRF is too small, the ERF stopped growing, or training ended.
Reason = Literal["trf", "stalled", "end"]

_ENLARGE = "dilated convolutions, more or earlier striding/pooling, larger kernels or attention"


def fmt_shape(shape: Sequence[int | float]) -> str:
    """An input's spatial shape as the messages write it (``"224x224"``)."""
    return "x".join(str(int(s)) for s in shape)


def _trailing_below(
    points: Sequence[tuple[int, float]], threshold: float
) -> list[tuple[int, float]]:
    """The last probes in a row whose coverage is below ``threshold`` (NaN counts as below)."""
    run: list[tuple[int, float]] = []
    for step, cov in reversed(points):
        if cov >= threshold:
            break
        run.append((step, cov))
    return run[::-1]


def projected(run: Sequence[tuple[int, float]], horizon: float) -> float:
    """Coverage ``horizon`` steps after the last point, on the least-squares line through
    ``run`` (at least two points of distinct steps)."""
    steps = [float(s) for s, _ in run]
    covs = [float(c) for _, c in run]
    ms, mc = sum(steps) / len(steps), sum(covs) / len(covs)
    var = sum((s - ms) ** 2 for s in steps)
    slope = sum((s - ms) * (c - mc) for s, c in zip(steps, covs)) / var if var else 0.0
    return covs[-1] + slope * horizon


@dataclass(frozen=True)
class AlertPolicy:
    """When a layer's coverage is too small to keep quiet about (see the module docstring).

    Args:
        patience: consecutive probes below the threshold before a mid-training alert
            (``1``: the first probe below fires, with no warm-up or trend check beyond
            ``warmup_steps``).
        warmup_steps: no mid-training alert before this step (unless the TRF is too small).

    Examples:
        >>> policy = AlertPolicy(patience=3, warmup_steps=100)
        >>> growing = [(0, 0.01), (100, 0.02), (200, 0.04)]
        >>> policy.decide(growing, 0.05) is None  # on its way: 0.04 + 200 * 0.00015 > 0.05
        True
        >>> policy.decide([(0, 0.01), (100, 0.01), (200, 0.01)], 0.05)
        'stalled'
        >>> policy.decide([(0, 0.01)], 0.05, best=0.03)  # its TRF allows at most 3%
        'trf'
        >>> policy.decide(growing, 0.05, final=True)  # training is over
        'end'
    """

    patience: int = DEFAULT_PATIENCE
    warmup_steps: int = DEFAULT_WARMUP_STEPS

    def decide(
        self,
        points: Sequence[tuple[int, float]],
        threshold: float,
        *,
        best: float = 1.0,
        final: bool = False,
    ) -> Reason | None:
        """Whether to alert now, given every probe's ``(step, coverage)`` so far, in order.

        Args:
            points: the layer's probes; the last one is the probe being judged.
            threshold: its ``min_coverage``.
            best: the most its clipped TRF allows (:func:`best_coverage`; 1.0 if unknown).
            final: the last probe of training (its final decision).

        Returns:
            ``None`` (no alert), or the reason: ``"trf"``, ``"stalled"`` or ``"end"``.
        """
        if not points or points[-1][1] >= threshold:
            return None
        if best < threshold:
            return "trf"
        if final:
            return "end"
        run = _trailing_below(points, threshold)
        step = points[-1][0]
        if len(run) < self.patience or step < self.warmup_steps:
            return None
        if len(run) >= 2 and projected(run, step - points[0][0]) >= threshold:
            return None  # still growing fast enough: give it the time it needs
        return "stalled"


def best_coverage(r: ERFResult | Mapping[str, float]) -> float:
    """The largest coverage a layer's clipped TRF allows (1.0 when global or unknown).

    Takes a result, or its logged metrics (``coverage`` / ``coverage_trf``, a history entry).
    """
    if isinstance(r, Mapping):
        if r.get("trf_global", 0.0) or r.get("trf_data_dependent", 0.0):
            return 1.0
        cov, per_trf = r.get("coverage", math.nan), r.get("coverage_trf", math.nan)
        best = cov / per_trf if per_trf > 0 else math.nan
        return best if math.isfinite(best) else 1.0
    if r.trf is None or r.trf.is_global:
        return 1.0
    return math.prod(r.trf.clipped_size) / math.prod(r.heatmap.shape)


def replay_alerts(
    history: Mapping[str, Mapping[int, Mapping[str, float]]],
    thresholds: Mapping[str, float],
    policy: AlertPolicy | None = None,
    *,
    final: bool = True,
) -> dict[str, tuple[int, Reason]]:
    """Judge a finished history (``{layer: {step: metrics}}``) probe by probe, as the monitor
    would have: ``{layer: (step, reason)}`` of the first alert per checked layer (``final``:
    the last probe is the end of training)."""
    policy = policy or AlertPolicy()
    fired: dict[str, tuple[int, Reason]] = {}
    for name, threshold in thresholds.items():
        probes = sorted(history.get(name, {}).items())
        points = [(int(s), float(v.get("coverage", math.nan))) for s, v in probes]
        for i, (step, values) in enumerate(probes):
            last = final and i == len(probes) - 1
            reason = policy.decide(
                points[: i + 1], threshold, best=best_coverage(values), final=last
            )
            if reason is not None:
                fired[name] = (int(step), reason)
                break
    return fired


def alert_message(
    name: str, r: ERFResult, step: int, threshold: float, reason: Reason, probes: int = 1
) -> str:
    """Two lines: what was measured against what (and why now), and what to do about it."""
    spatial = tuple(r.heatmap.shape)
    when = {
        "trf": "",
        "stalled": f" for {probes} consecutive probes and not growing towards it",
        "end": " at the end of training",
    }[reason]
    head = (
        f"erf-monitor: at step {step} the ERF of layer {name!r} covers only {r.coverage:.2%} of "
        f"the {fmt_shape(spatial)} input (95%-mass square {r.erf_size} px), below "
        f"min_coverage={threshold:.2%}{when}."
    )
    if r.trf is None:
        return f"{head}\nTry {_ENLARGE}; or watch a deeper layer or lower min_coverage."
    best = best_coverage(r)
    trf = "global" if r.trf.is_global else f"{r.trf.clipped_text('x')} px"
    if best < threshold:
        return (
            f"{head}\nIts TRF ({trf}) allows at most {best:.1%}: only an architecture change "
            f"helps ({_ENLARGE}); or watch a deeper layer or lower min_coverage."
        )
    return (
        f"{head}\nIts TRF ({trf}) allows {best:.0%}: train longer, or enlarge the ERF "
        f"({_ENLARGE}); or watch a deeper layer or lower min_coverage."
    )


class CoverageAlerts:
    """A monitor's alert state: which layers alerted (at which step), and each checked
    layer's count of consecutive probes below its threshold (both checkpointed)."""

    def __init__(self, policy: AlertPolicy) -> None:
        self.policy = policy
        self.below: dict[str, int] = {}
        self.alerted: dict[str, int] = {}

    def check(
        self,
        results: Mapping[str, ERFResult],
        step: int,
        history: Mapping[str, Mapping[int, Mapping[str, float]]],
        thresholds: Mapping[str, float],
        sinks: Sink,
        *,
        final: bool = False,
    ) -> list[str]:
        """Judge the probe at ``step`` (already in ``history``); fire each new alert once:
        an :class:`~erf_monitor.ERFCoverageWarning` and ``sinks.alert``. Returns the messages."""
        fired: list[str] = []
        for name, threshold in thresholds.items():
            if name not in results or name in self.alerted:
                continue
            r = results[name]
            probes = sorted(history.get(name, {}).items())
            points = [(int(s), float(v.get("coverage", math.nan))) for s, v in probes]
            if not points or points[-1][0] != step:  # a probe that the history did not keep
                points.append((step, float(r.coverage)))
            self.below[name] = len(_trailing_below(points, threshold))
            reason = self.policy.decide(points, threshold, best=best_coverage(r), final=final)
            if reason is None:
                continue
            self.alerted[name] = step
            msg = alert_message(name, r, step, threshold, reason, self.below[name])
            fired.append(msg)
            _warn.warn(msg, ERFCoverageWarning)
            sinks.alert(f"erf_coverage/{name}", msg, step)
        return fired
