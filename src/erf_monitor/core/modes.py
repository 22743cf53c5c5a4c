"""The ERF conventions ("modes"): which unit is seeded, how a gradient becomes a map.

Each mode is one published protocol, written out in :data:`DEFINITIONS` (that exact text is
saved with every result: ``metrics.json``, ``.npz`` files, a text entry in every logger) and
implemented by the three small functions below plus :func:`erf_monitor.measure.metrics.finalise_map`
(the normalisation over samples). ``y`` is the layer output on its spatial grid ``(N, K, *S')``
(token outputs on their patch grid), ``c'`` the seed unit, ``x`` the input ``(N, C, *S)``.

* ``"luo"`` (Luo et al. 2016): seed ``sum_k y[n, k, c']``, per-sample map ``sum_c |g_n[c]|``,
  mean over samples.
* ``"replknet"`` (RepLKNet's ``erf/visualize_erf.py`` + ``analyze_erf.py``): seed
  ``sum_k relu(y[n, k, c'])``, per-sample map ``sum_c relu(g_n[c])``, mean over samples
  (their meter's ``.avg``), then ``log10(mean + 1) / max``.
* ``"openerf"`` (OpenERF, Kim et al. BMVC 2023): seed ``mean_k y[n, k, c']`` with the
  upper-left central token on even token grids, per-sample map ``relu(mean_c g_n[c])`` (the
  signed channel mean, then clamped), summed over samples and normalised to total mass 1.

The seed unit is ``c' = S' // 2`` per spatial dim (for even sizes the lower-right of the
central units) in every mode, except ``"openerf"`` on token outputs, where it is
``(S' - 1) // 2`` (the upper-left of the central tokens, OpenERF's ``center_token_idx``).
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch

__all__ = [
    "DEFINITIONS",
    "DEFINITION_KEY",
    "MODES",
    "MODE_KEY",
    "Mode",
    "check_mode",
    "describe",
    "metadata",
    "sample_maps",
    "seed_index",
    "seed_value",
]

Mode = Literal["luo", "replknet", "openerf"]

#: Every mode, in the order they are documented.
MODES: tuple[Mode, ...] = ("luo", "replknet", "openerf")

#: The exact definition of each mode, saved with every result.
DEFINITIONS: dict[str, str] = {
    "luo": (
        "Luo et al. 2016. Seed unit c' = S'//2 (lower-right central unit on even sizes). "
        "g_n = d(sum_k y[n,k,c']) / d x[n]; P_n = sum_c |g_n[c]|; E = mean_n P_n."
    ),
    "replknet": (
        "RepLKNet (Ding et al. 2022, erf/visualize_erf.py + analyze_erf.py). Seed unit "
        "c' = S'//2. g_n = d(sum_k relu(y[n,k,c'])) / d x[n]; P_n = sum_c relu(g_n[c]); "
        "M = mean_n P_n; A = log10(M + 1) / max(log10(M + 1))."
    ),
    "openerf": (
        "OpenERF (Kim et al. BMVC 2023). Seed unit c' = S'//2 for conv-like outputs, "
        "(S'-1)//2 (upper-left central token on even grids) for token outputs. "
        "g_n = d(mean_k y[n,k,c']) / d x[n]; P_n = relu(mean_c g_n[c]); "
        "E = sum_n P_n / sum(sum_n P_n) (total mass 1)."
    ),
}


#: Entries of saved ``.npz`` map files that record the mode (0-d string arrays, no pickle).
MODE_KEY = "__mode__"
DEFINITION_KEY = "__definition__"


def metadata(mode: str) -> dict[str, Any]:
    """``{MODE_KEY: mode, DEFINITION_KEY: definition}`` as 0-d NumPy string arrays, the
    entries saved next to the maps in ``.npz`` files.

    Examples:
        >>> str(metadata("luo")[MODE_KEY])
        'luo'
    """
    import numpy as np

    return {MODE_KEY: np.array(check_mode(mode)), DEFINITION_KEY: np.array(DEFINITIONS[mode])}


def check_mode(mode: Any) -> Mode:
    """``mode`` if it is a known mode, else ``ValueError`` listing them."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    return cast(Mode, mode)


def describe(mode: str) -> str:
    """``"mode=<name>: <definition>"``, the text recorded with saved and logged results."""
    return f"mode={mode}: {DEFINITIONS[check_mode(mode)]}"


def seed_index(mode: str, grid: tuple[int, ...], tokens: bool = False) -> tuple[int, ...]:
    """Index of the seed unit on an output grid ``S'`` (``()`` for an output without one).

    Examples:
        >>> seed_index("luo", (8, 7)), seed_index("openerf", (8, 7), tokens=True)
        ((4, 3), (3, 3))
    """
    if mode == "openerf" and tokens:
        return tuple((s - 1) // 2 for s in grid)
    return tuple(s // 2 for s in grid)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors in float32 (sums of many terms), float32/64 as they are: a
    float64 probe keeps float64 all the way (a degenerate seed is resolved only there)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def seed_value(unit: torch.Tensor, mode: str) -> torch.Tensor:
    """The scalar differentiated: the seed unit ``(N, K)`` reduced over channels and samples.

    Samples do not interact (eval mode), so one backward of this sum gives every sample's
    gradient.
    """
    unit = _at_least_float32(unit)
    if mode == "replknet":
        return torch.relu(unit).sum()
    if mode == "openerf":
        return unit.mean(1).sum()
    return unit.sum()


def sample_maps(grad: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-sample maps ``(N, *S)`` from the input gradient ``(N, C, *S)``."""
    grad = _at_least_float32(grad)
    if mode == "replknet":
        return grad.clamp_min(0).sum(1)
    if mode == "openerf":
        return grad.mean(1).clamp_min(0)
    return grad.abs().sum(1)
