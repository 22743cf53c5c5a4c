"""Which watched layers the coverage alert checks, against which threshold.

A float ``min_coverage`` checks only the deepest watched layer (early stages never cover the
image: they are watched, not judged); a mapping checks exactly the layers its keys name, with
the glob dialect of ``layers=`` (:func:`~erf_monitor.targets.layers.spec_matches`: ``*`` and
``?`` within one dotted segment, ``**`` across; the first key that matches gives the
threshold); ``None`` checks none.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import nn

from erf_monitor.monitor.alerts import fmt_shape
from erf_monitor.monitor.options import MinCoverage
from erf_monitor.targets.layers import Located, resolve_layers, spec_matches, unwrap_model

if TYPE_CHECKING:
    from erf_monitor.trf.types import TRF

__all__ = ["check_threshold_keys", "deepest_layer", "note_small_trfs", "resolve_thresholds"]

log = logging.getLogger("erf_monitor")


def deepest_layer(targets: Sequence[Located], order: Sequence[str]) -> str:
    """The spec of the watched layer that runs last: the one whose module's subtree ends last
    in ``order`` (the model's module names in ``named_modules()`` order: a container after
    its children); a target with an output selector counts as its module. Ties keep the
    later target."""

    def end(target: Located) -> tuple[int, int]:
        path = target.path
        last = max(
            (i for i, n in enumerate(order) if path in ("", n) or n.startswith(path + ".")),
            default=-1,
        )
        return last, -path.count(".")

    best = targets[0]
    for target in targets[1:]:
        if end(target) >= end(best):
            best = target
    return best.spec


def check_threshold_keys(model: nn.Module, min_coverage: MinCoverage) -> None:
    """Raise ``ValueError`` for a ``min_coverage`` key that names no module of ``model``."""
    if not isinstance(min_coverage, Mapping):
        return
    table = [n for n, _ in unwrap_model(model).named_modules() if n]
    for spec in min_coverage:
        with contextlib.suppress(ValueError):
            resolve_layers(model, [spec])  # also names with output selectors
            continue
        if not any(spec_matches(n, spec) for n in table):
            raise ValueError(
                f"min_coverage names layer {spec!r}, which matches no module of the model."
            )


def resolve_thresholds(
    net: nn.Module, targets: Sequence[Located], min_coverage: MinCoverage
) -> dict[str, float]:
    """``{layer spec: threshold}`` of the checked layers among the plan's ``targets``."""
    if min_coverage is None or not targets:
        return {}
    if not isinstance(min_coverage, Mapping):
        order = [n for n, _ in unwrap_model(net).named_modules()]
        return {deepest_layer(targets, order): float(min_coverage)}
    out: dict[str, float] = {}
    for target in targets:
        for spec, value in min_coverage.items():
            if spec_matches(target.spec, spec):
                out[target.spec] = value
                break
    return out


def note_small_trfs(
    thresholds: Mapping[str, float],
    trfs: Mapping[str, TRF | None],
    spatial: tuple[int, ...],
    noted: set[str],
) -> None:
    """Log (information, once per layer: ``noted``) when a checked layer's TRF cannot cover
    the input."""
    area = math.prod(spatial)
    for name, threshold in thresholds.items():
        trf = trfs.get(name)
        if name in noted or trf is None or trf.is_global:
            continue
        clipped = trf.clipped_size
        if all(c >= s for c, s in zip(clipped, spatial)):
            continue
        noted.add(name)
        best = math.prod(clipped) / area
        log.info(
            "erf-monitor: the theoretical receptive field of layer %r (%s px) is smaller "
            "than the %s input: its ERF can cover at most %.1f%% of it "
            "(min_coverage %.1f%%%s).",
            name,
            trf.clipped_text("x"),
            fmt_shape(spatial),
            100 * best,
            100 * threshold,
            ": unreachable, only an architecture change helps" if best < threshold else "",
        )
