"""The ``metrics.json`` format of ``erf-monitor analyze``: one JSON record per probed layer
(non-finite numbers as ``null``), with its bootstrap intervals where asked for."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from erf_monitor.measure.result import ERFResult

__all__ = ["INTERVAL_METRICS", "intervals", "json_float", "result_record"]

#: The metrics whose bootstrap intervals ``analyze --bootstrap`` records (the table's).
INTERVAL_METRICS = ("area_t20", "area_t30", "area_t50", "area_t99", "erf_size", "coverage")


def json_float(v: float) -> float | None:
    """``v`` as JSON holds it: ``None`` (``null``) for NaN and infinities."""
    return float(v) if math.isfinite(v) else None


def result_record(r: ERFResult) -> dict[str, Any]:
    """One layer's record: output shape, TRF, centre, metrics and probed positions."""
    trf = r.trf
    rec: dict[str, Any] = {"output_shape": list(r.output_shape), "num_samples": r.num_samples}
    if trf is None:
        rec["trf"] = None
    else:
        rec["trf"] = {
            "size": [json_float(s) for s in trf.size],
            "stride": [json_float(s) for s in trf.stride],
            "clipped": [[int(s), int(e)] for s, e in trf.clipped],
            "clipped_size": list(trf.clipped_size),
            "global": [bool(g) for g in trf.global_dims],
            "data_dependent": trf.data_dependent,
            "reason": trf.reason,
            "method": trf.method,
        }
        if trf.data_dependent:  # no finite field: no interval to report
            del rec["trf"]["clipped"], rec["trf"]["clipped_size"]
    rec["centre_pixel"] = list(r.centre_pixel)
    rec["theoretical_centre"] = [float(c) for c in r.theoretical_centre]
    if r.trf_issue is not None:
        rec["trf_issue"] = r.trf_issue
    rec["metrics"] = {k: json_float(v) for k, v in r.scalars().items()}
    rec["position"] = r.position
    rec["output_index"] = list(r.output_index)
    if r.trf is not None and not r.trf.data_dependent:
        rec["trf"]["interval"] = [[json_float(a), json_float(b)] for a, b in r.trf.interval]
    if r.field is not None:
        rec["positions"] = {key: result_record(x) for key, x in r.field.items() if key != "centre"}
    return rec


def intervals(
    r: ERFResult, *, n_boot: int, level: float, seed: int
) -> dict[str, dict[str, float | None]]:
    """The bootstrap intervals of :data:`INTERVAL_METRICS` over ``r``'s probe images."""
    from erf_monitor.measure.bootstrap import bootstrap_metrics

    cis = bootstrap_metrics(r, list(INTERVAL_METRICS), n_boot=n_boot, level=level, seed=seed)
    return {
        k: {"value": json_float(ci.value), "low": json_float(ci.low),
            "high": json_float(ci.high), "std": json_float(ci.std)}
        for k, ci in cis.items()
    }  # fmt: skip
