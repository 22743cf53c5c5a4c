"""ERF budgets as unit tests: :func:`assert_erf` (public as ``erf_monitor.testing.assert_erf``).

A budget bounds one layer's ERF on seeded noise at a given input size: its coverage (the
95%-mass square's share of the input, the number the monitor's alert checks), its ERF size in
pixels, or its ERF/TRF ratio. A failed budget raises ``AssertionError`` whose message names the
layer, the measured value with its bootstrap interval over the probe images, the bound and the
layer's TRF, and says when the TRF alone makes the bound impossible (then no training helps,
only an architecture change).

The probe images are standard Gaussian noise from a private generator seeded with ``seed``:
the same numbers for the same model, layer, size and seed, and no global RNG is touched. The
probe plan (layers, TRFs, seed units) is cached per model by :func:`~erf_monitor.compute_erf`,
so several budgets on one model pay for the TRF analysis once.

For plain ``assert`` statements, :func:`measure_erf` returns the layer's numbers as floats
whose ``repr`` (what pytest prints for a failed ``assert``) holds the bootstrap interval and
the TRF: ``assert measure_erf(net, "layer4", input_size=224).coverage >= 0.5``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from erf_monitor.core.devices import model_device_dtype
from erf_monitor.core.modes import Mode
from erf_monitor.core.shapes import ntuple

if TYPE_CHECKING:
    from erf_monitor.measure.bootstrap import Interval
    from erf_monitor.measure.result import ERFResult

__all__ = ["Measured", "MeasuredERF", "assert_erf", "measure_erf", "probe_noise"]

#: ``(option, metric key, label, format, is a lower bound)`` of every bound.
_BOUNDS = (
    ("min_coverage", "coverage", "coverage", ".1%", True),
    ("max_coverage", "coverage", "coverage", ".1%", False),
    ("min_erf_size", "erf_size", "ERF size", ".0f", True),
    ("min_ratio", "erf_trf_ratio", "ERF/TRF ratio", ".2f", True),
)


def _size(input_size: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(input_size, int):
        size = ntuple(int(input_size), 2)
    else:
        size = tuple(map(int, input_size))
    if not 1 <= len(size) <= 3 or any(s < 1 for s in size):
        raise ValueError(f"input_size must be N or (H, W) with positive sizes, got {input_size!r}")
    return size


def _channels(model: nn.Module) -> int:
    """The input channels of the model's first convolution (3 when it has none)."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
    return 3


def probe_noise(
    model: nn.Module,
    input_size: int | Sequence[int],
    samples: int = 8,
    seed: int = 0,
    channels: int | None = None,
) -> torch.Tensor:
    """The probe images of :func:`assert_erf`: ``(samples, C, *input_size)`` standard Gaussian
    noise from a private generator seeded with ``seed`` (``C``: the first convolution's input
    channels unless given), on the model's device."""
    device, _ = model_device_dtype(model)
    shape = (samples, channels or _channels(model), *_size(input_size))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return x if device is None else x.to(device)


def _trf_text(r: ERFResult) -> tuple[str, float]:
    """The TRF as the message shows it, and the largest coverage it allows."""
    trf = r.trf
    if trf is None:
        return "unknown (the TRF analysis failed)", 1.0
    if trf.is_global or trf.data_dependent:
        return ("data-dependent" if trf.data_dependent else "global"), 1.0
    best = math.prod(trf.clipped_size) / math.prod(r.heatmap.shape)
    return f"{trf.size_text('x')} px ({trf.clipped_text('x')} px inside the input)", best


def _impossible(option: str, bound: float, r: ERFResult, best: float) -> str | None:
    """Why the TRF alone rules the bound out (``None`` when it does not)."""
    if option == "min_coverage" and bound > best:
        return f"the TRF allows at most {best:.1%} coverage"
    trf = r.trf
    if option == "min_erf_size" and trf is not None and not (trf.is_global or trf.data_dependent):
        widest = max(trf.clipped_size)
        if bound > widest:
            return f"the TRF is at most {widest} px wide inside the input"
    return None


class Measured(float):
    """A measured metric: a ``float`` whose ``repr`` adds its bootstrap interval and the
    layer's TRF (computed when first shown: a passing ``assert`` costs no bootstrap)."""

    _describe: Callable[[], str]

    def __new__(cls, value: float, describe: Callable[[], str]) -> Measured:
        obj = super().__new__(cls, value)
        obj._describe = describe
        return obj

    def __repr__(self) -> str:
        return f"{float(self):.4g} ({self._describe()})"

    __str__ = __repr__


class MeasuredERF:
    """One layer's ERF on seeded noise, as :func:`measure_erf` returns it.

    Attributes:
        layer: the layer's name.
        result: its :class:`~erf_monitor.ERFResult` (per-sample maps kept).
        coverage: the 95%-mass square's share of the input (:class:`Measured`).
        erf_size: the square's side in pixels (:class:`Measured`).
        ratio: ERF size over the clipped TRF size (:class:`Measured`).
    """

    def __init__(self, layer: str, result: ERFResult, seed: int, n_boot: int, level: float):
        self.layer, self.result = layer, result
        self._seed, self._n_boot, self._level = seed, n_boot, level
        self._intervals: dict[str, Interval] = {}
        self.coverage = self._measured("coverage", ".1%")
        self.erf_size = self._measured("erf_size", ".0f")
        self.ratio = self._measured("erf_trf_ratio", ".2f")

    def interval(self, key: str) -> Interval:
        """The bootstrap interval of metric ``key`` (a key of ``result.scalars()``)."""
        if key not in self._intervals:
            from erf_monitor.measure.bootstrap import bootstrap_metrics

            self._intervals.update(
                bootstrap_metrics(self.result, [key], n_boot=self._n_boot, level=self._level,
                                  seed=self._seed, method="percentile")
            )  # fmt: skip
        return self._intervals[key]

    def _measured(self, key: str, spec: str) -> Measured:
        def describe() -> str:
            ci = self.interval(key)
            trf, best = _trf_text(self.result)
            limit = f", allows at most {best:.1%} coverage" if key == "coverage" else ""
            return (
                f"{key} of {self.layer!r}: {round(self._level * 100)}% bootstrap interval "
                f"{ci.low:{spec}} to {ci.high:{spec}} over {self.result.num_samples} noise "
                f"images; TRF {trf}{limit}"
            )

        return Measured(float(self.result.scalars([key])[key]), describe)


def measure_erf(
    model: nn.Module,
    layer: str,
    *,
    input_size: int | Sequence[int],
    samples: int = 8,
    seed: int = 0,
    mode: Mode = "luo",
    channels: int | None = None,
    n_boot: int = 200,
    level: float = 0.95,
) -> MeasuredERF:
    """``layer``'s ERF on seeded noise (see :func:`assert_erf` for the arguments), for plain
    ``assert`` statements: a failed one prints the value with its interval and the TRF.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3))
        >>> erf = measure_erf(net, "1", input_size=16)
        >>> erf.erf_size >= 3, erf.coverage < 0.5
        (True, True)
        >>> erf.coverage  # doctest: +ELLIPSIS
        0.0... (coverage of '1': 95% bootstrap interval ... TRF 5x5 px (5x5 px inside the input), \
allows at most 9.8% coverage)
    """
    from erf_monitor.probe.compute import compute_erf

    if samples < 2:
        raise ValueError(f"samples must be >= 2 (the interval resamples them), got {samples}")
    x = probe_noise(model, input_size, samples, seed, channels)
    r = compute_erf(model, x, [layer], mode=mode, keep_per_sample=True)[layer]
    return MeasuredERF(layer, r, seed, n_boot, level)


def assert_erf(
    model: nn.Module,
    layer: str,
    *,
    input_size: int | Sequence[int],
    min_coverage: float | None = None,
    max_coverage: float | None = None,
    min_erf_size: float | None = None,
    min_ratio: float | None = None,
    samples: int = 8,
    seed: int = 0,
    mode: Mode = "luo",
    channels: int | None = None,
    n_boot: int = 200,
    level: float = 0.95,
) -> ERFResult:
    """Assert that ``layer``'s ERF meets its budget on seeded noise at ``input_size``.

    Args:
        model: the model (probed as it is: random init, or loaded weights).
        layer: the layer's name (as ``compute_erf`` takes it).
        input_size: ``N`` or ``(H, W)`` (1 to 3 spatial dims).
        min_coverage: the 95%-mass square covers at least this share of the input.
        max_coverage: ... and at most this share (a layer that must stay local).
        min_erf_size: the 95%-mass square's side is at least this many pixels.
        min_ratio: ERF size over the clipped TRF size is at least this.
        samples: probe images (seeded noise).
        seed: seeds the noise and the bootstrap resampling.
        mode: the ERF convention.
        channels: input channels (default: those of the model's first convolution, else 3).
        n_boot: bootstrap resamples for the interval in a failure's message.
        level: the interval's coverage.

    Returns:
        The layer's :class:`~erf_monitor.ERFResult`, for further checks.

    Raises:
        AssertionError: a bound is not met; the message names the layer, the value with its
            bootstrap interval, the bound and the TRF (and says when the TRF itself makes the
            bound impossible).
        ValueError: no bound given, or bounds that contradict each other.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3))
        >>> r = assert_erf(net, "1", input_size=16, min_erf_size=3)
        >>> assert_erf(net, "1", input_size=16, min_coverage=0.5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        AssertionError: ERF budget of layer '1' not met: coverage ... below min_coverage 50.0% ...
    """
    bounds = {
        "min_coverage": min_coverage,
        "max_coverage": max_coverage,
        "min_erf_size": min_erf_size,
        "min_ratio": min_ratio,
    }
    if all(v is None for v in bounds.values()):
        raise ValueError(
            "assert_erf needs a bound: min_coverage, max_coverage, min_erf_size or min_ratio"
        )
    if min_coverage is not None and max_coverage is not None and min_coverage > max_coverage:
        raise ValueError(f"min_coverage {min_coverage} is above max_coverage {max_coverage}")
    erf = measure_erf(
        model, layer, input_size=input_size, samples=samples, seed=seed, mode=mode,
        channels=channels, n_boot=n_boot, level=level,
    )  # fmt: skip
    r = erf.result
    failed = []
    for option, key, label, spec, lower in _BOUNDS:
        bound = bounds[option]
        if bound is None:
            continue
        value = float(r.scalars([key])[key])
        if not math.isfinite(value) or (value < bound if lower else value > bound):
            failed.append((option, key, label, spec, lower, bound))
    if not failed:
        return r
    trf_text, best = _trf_text(r)
    shape = "x".join(map(str, r.heatmap.shape))
    lines = []
    for option, key, label, spec, lower, bound in failed:
        ci = erf.interval(key)
        lines.append(
            f"ERF budget of layer {layer!r} not met: {label} {ci.value:{spec}} "
            f"({round(level * 100)}% bootstrap interval {ci.low:{spec}} to {ci.high:{spec}} "
            f"over {samples} noise images, seed {seed}) is "
            f"{'below' if lower else 'above'} {option} {bound:{spec}} at {shape} px."
        )
        why = _impossible(option, bound, r, best)
        if why is not None:
            lines.append(
                f"  The bound is impossible for this architecture at this input size: {why}; "
                "no training can meet it, only an architecture change (dilation, more "
                "striding, larger kernels, attention) or a smaller input."
            )
    lines.append(f"  TRF of {layer!r}: {trf_text}.")
    raise AssertionError("\n".join(lines))
