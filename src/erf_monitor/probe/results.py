"""From raw maps to results: each seed unit's published map, its TRF checked against it, its
theoretical centre, and the warnings a user needs (a zero map, a contradicted TRF, an
estimated centre, a constant seed, cropping that did not reproduce a unit).

The consistency check runs on every probe: mass outside a finite clipped TRF means the TRF is
wrong; it is then reported unknown (``trf`` ``None``, ``trf_issue`` says why).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from erf_monitor.core.errors import ERFProbeWarning
from erf_monitor.core.warn import warn
from erf_monitor.measure.metrics import finalise_map
from erf_monitor.measure.result import ERFField, ERFResult, ERFResults
from erf_monitor.probe.crop import Index
from erf_monitor.probe.plan import ProbePlan
from erf_monitor.probe.run import Maps
from erf_monitor.targets.positions import PositionRequest
from erf_monitor.trf.masks import MASKED
from erf_monitor.trf.types import TRF, wrap_flags

__all__ = ["build_results", "mass_outside", "proportional_centre"]

log = logging.getLogger("erf_monitor")


def build_results(plan: ProbePlan, maps: Maps, n: int, keep_per_sample: bool) -> ERFResults:
    """The :class:`~erf_monitor.ERFResults` of a probe of ``n`` samples."""
    spatial = plan.spatial
    req = plan.request
    results: dict[str, ERFResult] = {}
    estimated: list[str] = []
    for target in plan.targets:
        name, grid = target.spec, target.grid
        keyed = plan.units[name]
        by_key: dict[str, ERFResult] = {}
        zero: list[str] = []
        issues: dict[str, str] = {}
        for key, idx in keyed.items():
            total = maps.sums[(name, idx)]
            heat = finalise_map(total, n, plan.mode)
            if not bool((heat > 0).any()):
                zero.append(key)
            unit_geometry = plan.geometry.get(name, {}).get(key)
            centre, guessed = _unit_centre(unit_geometry, grid, idx, spatial)
            wrapped = () if guessed or unit_geometry is None else unit_geometry.wrapped
            if guessed and name not in estimated:
                estimated.append(name)
            layer_trf, issue = _checked_trf(plan.trfs.get(name, {}).get(key), total)
            if issue is not None:
                issues[key] = issue
            per_sample = maps.per_sample.get((name, idx)) if keep_per_sample else None
            by_key[key] = ERFResult(
                name=name,
                heatmap=heat,
                trf=layer_trf,
                mode=plan.mode,
                num_samples=n,
                output_shape=grid,
                centre_pixel=_round_centre(centre, spatial, wrapped),
                per_sample=torch.cat(per_sample).float() if per_sample else None,
                num_calls=maps.calls.get(name, 1),
                centre=centre,
                trf_issue=issue,
                position=key,
                output_index=idx,
                wrapped=tuple(wrapped),
            )
        # (a non-zero constant seed with an exactly zero map: dead ReLUs before a bias, said
        # below; a LayerNorm's zero sum is said here, whatever its map)
        if name in maps.constant and (len(zero) < len(keyed) or name not in maps.steady):
            _warn_constant(name)
            zero = []  # said above, and why
        _warn_layer(name, zero, issues, estimated, keyed, req, name in maps.detached)
        primary = by_key[req.primary.key]
        if req.is_set:
            primary.field = ERFField(by_key, grid=req.grid)
        results[name] = primary
    if maps.resolved - maps.constant:
        log.info(
            "erf-monitor: the seed of layer(s) %s cancels in %s (a channel sum after a "
            "LayerNorm); probed again in float64 (docs/concepts.md, Precision).",
            sorted(maps.resolved - maps.constant),
            str(plan.dtype).replace("torch.", ""),
        )
    # Layers whose TRF the map contradicts were just warned about: that is why.
    fell_back = [
        n
        for n in dict.fromkeys(maps.fell_back)
        if n not in maps.rejected and not _contradicted(results[n])
    ]
    if fell_back:
        warn(
            f"erf-monitor: cropping to the TRF did not reproduce layer(s) {sorted(set(fell_back))} "
            "exactly (the cropped output lacked the seed unit or its gradient reached the "
            "crop border); they were probed on the full input. Please report this with the "
            "model.",
            ERFProbeWarning,
        )
    return ERFResults(results)


def _warn_constant(name: str) -> None:
    warn(
        f"Layer {name!r}: the sum over channels of its seed unit is constant for every probe "
        "sample (also in float64), so its ERF is zero by construction and the map is rounding "
        "noise. This is what a LayerNorm over the channels with a uniform scale outputs (e.g. "
        "a ViT's final norm or a post-norm TransformerEncoderLayer at initialisation): watch "
        "the layer before the norm, or use mode='replknet'.",
        ERFProbeWarning,
    )


def proportional_centre(
    index: tuple[int, ...], grid: tuple[int, ...], spatial: tuple[int, ...]
) -> tuple[float, ...]:
    """Where output unit ``index`` of a ``grid`` would sit if it spread evenly over the input.

    ``(i + 0.5) * S / S' - 0.5`` per dim: the theoretical centre of a unit whose field is the
    whole input (a global dim); the input's middle for an output without a grid.
    """
    if not grid:
        return tuple((s - 1) / 2 for s in spatial)
    return tuple((i + 0.5) * s / g - 0.5 for i, s, g in zip(index, spatial, grid))


def _round_centre(
    centre: Sequence[float], spatial: tuple[int, ...], wrapped: Sequence[bool] = ()
) -> tuple[int, ...]:
    """Round half up, clamped into the input (modulo its size where the field wraps)."""
    return tuple(
        math.floor(c + 0.5) % s if w else min(max(math.floor(c + 0.5), 0), s - 1)
        for c, s, w in zip(centre, spatial, wrap_flags(wrapped, len(spatial)))
    )


def mass_outside(total: torch.Tensor, trf: TRF) -> float:
    """Fraction of a map's mass outside the clipped TRF box (0.0 exactly when none is)."""
    box = tuple(slice(int(lo), int(hi) + 1) for lo, hi in trf.clipped)
    outside = total.detach().double().abs().clone()
    outside[box] = 0.0
    spill = float(outside.sum())
    if spill == 0.0:
        return 0.0
    return spill / float(total.detach().double().abs().sum())


def _contradicted(r: ERFResult) -> bool:
    results = r.field.values() if r.field is not None else [r]
    return any(x.trf_issue is not None for x in results)


def _warn_layer(
    name: str,
    zero: list[str],
    issues: Mapping[str, str],
    estimated: list[str],
    keyed: Mapping[str, Index],
    req: PositionRequest,
    detached: bool = False,
) -> None:
    """One warning per layer and kind, naming the positions (none for the centre alone)."""

    def where(keys: Sequence[str]) -> str:
        return "" if req.is_default else f" (position(s) {', '.join(keys)})"

    if zero:
        why = (
            "autograd finds no path from it to the input: torch.no_grad() or .detach() in "
            "the forward, or a layer that does not depend on the input"
            if detached
            else "dead ReLUs, or a layer that does not depend on the input"
        )
        warn(
            f"Layer {name!r}: the ERF gradient is zero everywhere{where(zero)} ({why}); its "
            "map is all zeros.",
            ERFProbeWarning,
        )
    if issues:
        first = next(iter(issues.values()))
        warn(
            f"Layer {name!r}: {first}{where(list(issues))} (no ERF/TRF ratio). Please report "
            "this with the model.",
            ERFProbeWarning,
        )
    if name in estimated:
        units = sorted(set(keyed.values()))
        shown = str(units[0]) if len(units) == 1 else f"{len(units)} seed units"
        warn(
            f"Layer {name!r}: the layer geometry could not be analysed, so the theoretical "
            f"centre of its seed unit {shown} is estimated as (i + 0.5) * S / S' - 0.5; "
            "mass squares and the centroid offset are measured around that estimate.",
            ERFProbeWarning,
        )


def _unit_centre(
    geometry: TRF | None,
    grid: tuple[int, ...],
    index: tuple[int, ...],
    spatial: tuple[int, ...],
) -> tuple[tuple[float, ...], bool]:
    """The seed unit's theoretical centre in input pixels, from the layer geometry, and
    whether it had to be estimated.

    Only when the geometry could not be analysed at all is the proportional estimate used
    (warned about by the caller: a number that may be off by the padding of a few layers).
    """
    if (
        geometry is not None
        and tuple(geometry.output_shape) == grid
        and tuple(geometry.output_centre) == index
        and tuple(geometry.input_shape) == spatial
    ):
        return tuple(float(c) for c in geometry.centre), False
    return proportional_centre(index, grid, spatial), bool(grid)


#: Mass outside a TRF that leaves out masked attention logits (``TRF.masked``) that the
#: masked-logit rule excuses: a masked key's weight is ``exp(-100)`` times an unmasked one's
#: of equal score; half that exponent leaves room for scores 50 apart.
MASKED_SPILL = math.exp(MASKED / 2)


def _checked_trf(trf: TRF | None, total: torch.Tensor) -> tuple[TRF | None, str | None]:
    """The consistency check: a finite TRF that the map has mass outside of is wrong (but
    for the ``exp(-100)``-sized gradients through masked logits, which are no dependence)."""
    if trf is None or trf.is_global or tuple(trf.input_shape) != tuple(total.shape):
        return trf, None
    spill = mass_outside(total, trf)
    if spill == 0.0 or (trf.masked and spill <= MASKED_SPILL):
        return trf, None
    issue = (
        f"{spill:.3g} of the ERF mass lies outside the clipped TRF {trf.clipped} ({trf}): the "
        "TRF analysis is wrong for this layer, so its TRF is reported unknown"
    )
    return None, issue
