"""The result types: one layer's ERF at one seed unit (:class:`ERFResult`), the ordered
collection ``compute_erf`` returns (:class:`ERFResults`), and one layer's results at a set of
seed units (:class:`ERFField`)."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from erf_monitor.core.modes import DEFINITIONS, Mode
from erf_monitor.core.threads import single_blas_thread
from erf_monitor.measure import metrics as _metrics
from erf_monitor.measure import profiles as _prof
from erf_monitor.measure import shape as _shape
from erf_monitor.measure.fit import GaussianFit, fit_gaussian
from erf_monitor.measure.profiles import Geometry, Profiles
from erf_monitor.trf.types import TRF, wrap_flags

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "AREA_THRESHOLDS",
    "METRIC_GROUPS",
    "METRIC_NAMES",
    "PER_AXIS",
    "ERFField",
    "ERFResult",
    "ERFResults",
    "Mode",
    "axis_names",
    "select_metrics",
]

#: Mass fractions at which area ratios are reported (RepLKNet Table 10 uses 20/30/50/99 %).
AREA_THRESHOLDS: tuple[float, ...] = (0.2, 0.3, 0.5, 0.99)

#: The keys of :meth:`ERFResult.scalars` by group (``*``: one key per axis or radius). What a
#: group costs is in ``docs/concepts.md`` ("What each metric costs"): ``trf`` is free,
#: ``extent``, ``moments`` and ``shape`` are a few passes over the map's field, ``openerf``
#: adds the Gaussian fit (least squares on the field), ``field`` the other positions' sizes.
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "trf": ("trf_size", "trf_size_clipped", "trf_global", "trf_data_dependent"),
    "extent": (
        "erf_size",
        "erf_trf_ratio",
        "coverage",
        *(f"area_t{round(t * 100):02d}" for t in AREA_THRESHOLDS),
        "coverage_trf",
        "erf_size_visible",
    ),
    "moments": ("sigma_?", "centroid_offset_?", "gaussian_r2"),
    "openerf": (
        "disc_mass_r*",
        "gauss_fit_amplitude",
        "gauss_fit_sigma_?",
        "gauss_fit_offset_?",
        "gauss_fit_r2",
    ),
    "shape": (
        "sigma_major",
        "sigma_minor",
        "anisotropy",
        "axis_angle",
        "cross_score",
        "dead_fraction",
        "gridding_period_?",
    ),
    "field": ("border_ratio",),
}

#: Metrics with one value per spatial axis (the groups' ``_?`` patterns): ``sigma`` stands for
#: ``sigma_y`` and ``sigma_x``.
PER_AXIS: tuple[str, ...] = tuple(
    p[:-2] for group in METRIC_GROUPS.values() for p in group if p.endswith("_?")
)


def _metric_names() -> tuple[str, ...]:
    """:data:`METRIC_GROUPS`' keys in their order, ``disc_mass_r*`` (the one ``*`` pattern)
    one per radius, then the per-axis ones by their base name."""
    names: list[str] = []
    for group in METRIC_GROUPS.values():
        for p in group:
            if p.endswith("*"):
                names.extend(f"{p[:-1]}{r}" for r in _metrics.OPENERF_RADII)
            elif not p.endswith("_?"):
                names.append(p)
    return (*names, *PER_AXIS)


#: The metric names users may ask for (``MonitorOptions.metrics``), derived from
#: :data:`METRIC_GROUPS` in its order (error messages list them so): every key, per-axis ones
#: by their base name (last), ``disc_mass_r*`` one per radius.
METRIC_NAMES: tuple[str, ...] = _metric_names()


def select_metrics(names: Iterable[str]) -> list[str]:
    """Expand group names (:data:`METRIC_GROUPS`) into key patterns and check every name.

    A name is a group, a key of :meth:`ERFResult.scalars` or a shell pattern of keys
    (``"disc_mass_r*"``). Keys that a result does not have (``axis_angle`` of a 3-D map, a
    disc larger than the map) are left out by ``scalars`` without complaint.

    Raises:
        ValueError: a name that is neither a group nor a key (nor matches one).

    Examples:
        >>> select_metrics(["trf", "coverage"])[-1]
        'coverage'
    """
    if isinstance(names, str):
        names = [names]
    patterns = [p for group in METRIC_GROUPS.values() for p in group]
    out: list[str] = []
    for name in names:
        if name in METRIC_GROUPS:
            out.extend(METRIC_GROUPS[name])
        elif any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(p, name) for p in patterns):
            out.append(name)
        else:
            raise ValueError(
                f"unknown metric {name!r}: give a group ({', '.join(METRIC_GROUPS)}) or a key "
                "of ERFResult.scalars() (e.g. 'coverage', 'sigma_x', 'disc_mass_r20')"
            )
    return out


def axis_names(ndim: int) -> tuple[str, ...]:
    """Names used for per-axis metrics: ``x`` (1-D), ``y, x`` (2-D), ``z, y, x`` (3-D)."""
    return ("z", "y", "x")[3 - ndim :] if 1 <= ndim <= 3 else tuple(f"d{i}" for i in range(ndim))


class _Frame(NamedTuple):
    """The map as metrics see it: rolled along the dims where the unit's field wraps around
    the input (circular padding) so that the field is in one piece around the middle."""

    map: torch.Tensor
    centre_pixel: tuple[int, ...]
    shift: tuple[int, ...]  # frame index = input index + shift (mod the size where wrapped)
    centre: tuple[float, ...]  # the theoretical centre in the frame
    box: tuple[tuple[int, int], ...] | None  # the clipped TRF in the frame (None: no TRF)


@dataclass(eq=False)
class ERFResult:
    """ERF of one layer, measured on one probe batch.

    Metrics follow ``docs/concepts.md`` (DESIGN §2) exactly and are computed lazily from
    :attr:`heatmap`; mass squares are centred on :attr:`centre_pixel`, the theoretical centre
    of the layer's seed unit rounded half up.

    Attributes:
        name: layer name as in ``model.named_modules()``.
        heatmap: ERF map, float32 CPU tensor of the input's spatial shape, ``>= 0``, as the
            ``mode`` defines it (:attr:`definition`): ``"luo"``: mean over samples of the
            channel-summed ``|d y_centre / d x|``; ``"replknet"``: ``log10(mean + 1) / max``
            of the channel-summed relu'd gradients; ``"openerf"``: the clamped channel-mean
            gradients summed over samples, normalised to total mass 1.
        trf: theoretical receptive field of the seed unit (``None`` if it is unknown: not
            analysed, or contradicted by the map, see :attr:`trf_issue`; then ``ratio`` is
            NaN).
        mode: ``"luo"``, ``"replknet"`` or ``"openerf"``.
        num_samples: number of probe samples.
        output_shape: spatial shape of the layer's output (``()`` if it has none).
        centre_pixel: integer input pixel on which mass squares are centred.
        per_sample: the per-sample maps ``(N, *S)`` if requested, else ``None``.
        num_calls: how often the module ran before the probe stopped the forward (the first
            call is the one measured).
        centre: the seed unit's theoretical centre in input pixels (float), from the layer
            geometry whether or not the TRF is reported; ``None``: :attr:`trf`'s centre.
        trf_issue: why a TRF that was analysed is reported unknown (ERF mass outside it),
            else ``None``.
        position: the key of the seed unit's position (``"centre"``, ``"corner_top_left"``,
            ``"y0_x-1"``...; see ``docs/guides/positions.md``); logged keys of any other
            position than the centre are ``<prefix>/<layer>/<position>/<metric>``.
        output_index: the seed unit's index on the layer's output grid (non-negative).
        field: with a set of positions, ``{position: ERFResult}`` of the layer (this result
            is the centre's); else ``None``.
        wrapped: per dim, whether the unit's field wraps around the input (circular
            padding, :attr:`TRF.wrapped <erf_monitor.TRF>`). The network lives on a torus
            there: metrics are measured on the map rolled so that the field is in one piece
            around :attr:`centre_pixel`, and positions (:attr:`centre_pixel`,
            :attr:`theoretical_centre`, :attr:`centroid`) are taken modulo the input size.
    """

    name: str
    heatmap: torch.Tensor
    trf: TRF | None
    mode: Mode
    num_samples: int
    output_shape: tuple[int, ...]
    centre_pixel: tuple[int, ...]
    per_sample: torch.Tensor | None = None
    num_calls: int = 1
    centre: tuple[float, ...] | None = None
    trf_issue: str | None = None
    position: str = "centre"
    output_index: tuple[int, ...] = ()
    field: ERFField | None = dataclasses.field(default=None, repr=False)
    wrapped: tuple[bool, ...] = ()
    _fits: dict[bool, GaussianFit] = dataclasses.field(default_factory=dict, repr=False)

    @cached_property
    def _frame(self) -> _Frame:
        shape = tuple(self.heatmap.shape)
        wrapped = wrap_flags(self.wrapped, len(shape))
        raw = self._raw_centre
        shift = tuple(
            n // 2 - c if w else 0 for n, c, w in zip(shape, self.centre_pixel, wrapped)
        )  # fmt: skip
        heat = self.heatmap
        if any(shift):
            heat = torch.roll(heat, shift, tuple(range(len(shape))))
        pixel = tuple(c + sh for c, sh in zip(self.centre_pixel, shift))
        # the theoretical centre's offset from the centre pixel, the shorter way round
        centre = tuple(
            p + (((t - c + n / 2) % n) - n / 2) if w else t
            for p, t, c, n, w in zip(pixel, raw, self.centre_pixel, shape, wrapped)
        )
        box = None
        if self.trf is not None:
            box = tuple(
                (max(int(lo) + round(f - t), 0), min(int(hi) + round(f - t), n - 1)) if w else clip
                for (lo, hi), f, t, n, w, clip in zip(
                    self.trf.interval, centre, raw, shape, wrapped, self.trf.clipped
                )
            )
        return _Frame(heat, pixel, shift, centre, box)

    @property
    def _raw_centre(self) -> tuple[float, ...]:
        if self.centre is not None:
            return self.centre
        if self.trf is not None:
            return self.trf.centre
        return tuple(float(c) for c in self.centre_pixel)

    def _unframe(self, position: Sequence[float]) -> tuple[float, ...]:
        """A frame position as an input position (modulo the size where the field wraps)."""
        f = self._frame
        return tuple(
            (p - sh) % n if sh else p for p, sh, n in zip(position, f.shift, self.heatmap.shape)
        )

    @cached_property
    def _array(self) -> np.ndarray:
        """The frame's map as a validated float64 array (checked once for every metric)."""
        return _metrics._as_array(self._frame.map)

    @property
    def disc_centre(self) -> tuple[int, ...]:
        """The pixel on which :meth:`disc_mass` centres its discs: the input's middle pixel
        ``S // 2`` (OpenERF's ``(H // 2, W // 2)``) for the centre unit in ``mode="openerf"``,
        else :attr:`centre_pixel` (the seed unit's theoretical centre)."""
        if self.mode == "openerf" and self.position == "centre":
            return tuple(s // 2 for s in self.heatmap.shape)
        return self.centre_pixel

    @cached_property
    def _geometry(self) -> Geometry:
        """Where the metrics are measured, in the frame (the same for bootstrap resamples)."""
        f = self._frame
        shape = tuple(self.heatmap.shape)
        disc = tuple((c + sh) % n for c, sh, n in zip(self.disc_centre, f.shift, shape))
        size = max(shape)
        radii = tuple(r for r in _metrics.OPENERF_RADII if r < size)
        return Geometry(shape, f.centre_pixel, disc, radii, f.box)

    @cached_property
    def _profiles(self) -> Profiles:
        """The map's linear summaries (:mod:`erf_monitor.measure.profiles`), computed on use."""
        return Profiles(self._geometry, self._array[None])

    # -- mass-based metrics ---------------------------------------------------------------
    def mass_extent(self, t: float = _metrics.COVERAGE_MASS) -> int:
        """Side of the smallest centred square (odd side) holding more than fraction ``t``."""
        i = int(_prof.extent_radius(self._profiles, _metrics._check_t(t))[0])
        return 0 if i < 0 else 2 * i + 1

    def mass_extent_per_axis(self, t: float = _metrics.COVERAGE_MASS) -> tuple[int, ...]:
        """Per-axis variant of :meth:`mass_extent` on the map's marginal profiles."""
        radii = _prof.extent_radius_per_axis(self._profiles, _metrics._check_t(t))
        return tuple(0 if int(i[0]) < 0 else 2 * int(i[0]) + 1 for i in radii)

    def area_ratio(self, t: float) -> float:
        """Fraction of the input area inside the ``t``-mass square."""
        return float(_prof.area_ratio(self._profiles, _metrics._check_t(t))[0])

    @property
    def erf_size(self) -> int:
        """ERF size in pixels: ``mass_extent(0.95)``."""
        return self.mass_extent(_metrics.COVERAGE_MASS)

    @property
    def coverage(self) -> float:
        """Fraction of the input inside the 95%-mass square: ``area_ratio(0.95)``."""
        return self.area_ratio(_metrics.COVERAGE_MASS)

    @property
    def visible_size(self) -> float:
        """Side of the 95%-mass square as the input clips it, ``(coverage * prod(S)) ** (1/D)``
        pixels: :attr:`erf_size` for a square inside the input, smaller where the border cuts
        it (the ERF size that the field figure and ``border_ratio`` compare)."""
        volume = round(self.coverage * self.heatmap.numel())
        nd = self.heatmap.dim()
        return math.sqrt(volume) if nd == 2 else float(volume) ** (1.0 / nd)

    @property
    def coverage_trf(self) -> float:
        """Fraction of the clipped TRF inside the 95%-mass square (NaN without a TRF).

        The image clips a border unit's field: this compares the ERF with what the unit can
        see at all, where :attr:`coverage` compares it with the whole input.
        """
        box = self._frame.box
        if box is None:
            return math.nan
        return float(_prof.coverage_within(self._profiles, _metrics.COVERAGE_MASS, box)[0])

    @property
    def ratio(self) -> float:
        """ERF/TRF ratio: ``erf_size`` over the largest per-axis clipped TRF size."""
        if self.trf is None:
            return math.nan
        return self.erf_size / max(self.trf.clipped_size)

    # -- shape metrics ----------------------------------------------------------------------
    @cached_property
    def _moments(self) -> tuple[np.ndarray, np.ndarray]:
        return _prof.moments(self._profiles)

    @cached_property
    def sigma(self) -> tuple[float, ...]:
        """Per-axis standard deviation (pixels) from second moments about the centroid."""
        return tuple(math.sqrt(v) for v in self._moments[1][0])

    @cached_property
    def gaussian_r2(self) -> float:
        """R^2 of the moment-matched Gaussian: 1 means perfectly Gaussian."""
        mus, variances = self._moments
        p = self._profiles
        r2 = _metrics.gaussian_r2_batch(p.windowed, mus, variances, p.window, p.geometry.shape)
        return float(r2[0])

    @cached_property
    def _frame_centroid(self) -> tuple[float, ...]:
        return tuple(float(m) for m in self._moments[0][0])

    @property
    def centroid(self) -> tuple[float, ...]:
        """Mass-weighted mean pixel index per axis."""
        return self._unframe(self._frame_centroid)

    @cached_property
    def principal_axes(self) -> tuple[tuple[float, ...], float]:
        """``(widths, angle)``: standard deviations along the principal axes of the map
        (largest first, pixels) and, in 2-D, the major axis' angle in degrees from ``+x``
        (columns) towards ``+y`` (rows), in ``(-90, 90]``."""
        widths, angle = _prof.principal_axes(self._profiles)
        return tuple(float(w) for w in widths[0]), float(angle[0])

    @property
    def anisotropy(self) -> float:
        """Largest over smallest principal width: 1 for an isotropic ERF, ``inf`` for a line."""
        return _shape.anisotropy(self.principal_axes[0])

    @property
    def axis_angle(self) -> float:
        """The major principal axis' angle in degrees (2-D; NaN otherwise)."""
        return self.principal_axes[1]

    @cached_property
    def cross_score(self) -> float:
        """``1 - E(O) / E0(O)``: how much less mass lies off the centre row and column than
        the marginals imply; 1 for a "+" pattern, 0 for a separable map (Gaussian, box),
        < 0 when the axes are avoided (``docs/concepts.md``)."""
        if self.heatmap.dim() == 2:
            return float(_prof.cross_score_2d(self._profiles)[0])
        return _shape.cross_score_nd(self._array, self._frame.centre_pixel)

    @cached_property
    def dead_fraction(self) -> float:
        """Fraction of the clipped TRF's pixels where the map is exactly zero (NaN without
        a TRF): dead pixels, e.g. the periodic holes that dilation leaves ("gridding")."""
        box = self._frame.box
        if box is None:
            return math.nan
        # zeros inside the box: all of it but the non-zero pixels, which lie in the window
        window = self._profiles.window
        cut = tuple(
            slice(max(lo, w.start), max(min(hi + 1, w.stop), max(lo, w.start)))
            for (lo, hi), w in zip(box, window)
        )
        size = math.prod(max(hi - lo + 1, 0) for lo, hi in box)
        return (size - int(np.count_nonzero(self._array[cut]))) / size if size else math.nan

    @cached_property
    def gridding_period(self) -> tuple[int, ...]:
        """Per axis, the period of the non-zero rows/columns inside the clipped TRF (1: none;
        the whole map without a TRF)."""
        return tuple(int(q) for q in _prof.gridding_period(self._profiles)[0])

    @property
    def theoretical_centre(self) -> tuple[float, ...]:
        """Where the seed unit sits in input pixels (the centre of its TRF interval)."""
        return self._unframe(self._frame.centre)

    @property
    def definition(self) -> str:
        """The exact definition of :attr:`mode` (recorded with saved and logged results)."""
        return DEFINITIONS[self.mode]

    @property
    def centroid_offset(self) -> tuple[float, ...]:
        """Centroid minus theoretical centre, in pixels per axis (the shorter way round where
        the field wraps)."""
        return tuple(c - t for c, t in zip(self._frame_centroid, self._frame.centre))

    # -- OpenERF metrics ---------------------------------------------------------------------
    def disc_mass(
        self,
        radii: Sequence[float] = _metrics.OPENERF_RADII,
        centre: Sequence[int] | None = None,
    ) -> dict[float, float]:
        """Fraction of the mass within Euclidean distance ``r`` of the centre, per radius.

        OpenERF's radial cumulative mass (default radii are OpenERF's); the discs are centred
        on :attr:`disc_centre` unless ``centre`` is given: OpenERF's ``(H // 2, W // 2)`` for
        the centre unit in ``mode="openerf"``, the seed unit's theoretical centre pixel
        (:attr:`centre_pixel`) otherwise. See :func:`erf_monitor.measure.metrics.disc_mass`.
        """
        f = self._frame
        where = self.disc_centre if centre is None else tuple(centre)
        where = tuple((c + sh) % n for c, sh, n in zip(where, f.shift, self.heatmap.shape))
        if tuple(radii) == self._geometry.radii and where == self._geometry.disc_centre:
            fractions = _prof.disc_fractions(self._profiles)[0]
            return {r: float(v) for r, v in zip(radii, fractions)}
        return _metrics.disc_mass(self._array, radii, where)

    def gaussian_fit(self, rotated: bool = False) -> GaussianFit:
        """Free-centre 2-D Gaussian least-squares fit to the map normalised to sum 1 (OpenERF).

        ``rotated=False`` is OpenERF's axis-aligned model; ``True`` also fits the covariance's
        off-diagonal term. Cached per ``rotated``. See
        :func:`erf_monitor.measure.metrics.gaussian_fit`.

        Raises:
            ValueError: for a map that is not 2-D.
        """
        fit = self._frame_fit(rotated)
        if not any(self._frame.shift):
            return fit
        cy, cx = self._unframe(fit.centre)  # the fit is 2-D
        return dataclasses.replace(fit, centre=(cy, cx))

    def _frame_fit(self, rotated: bool) -> GaussianFit:
        if rotated not in self._fits:
            if self._array.ndim != 2:
                raise ValueError(f"gaussian_fit needs a 2-D map, got shape {self._array.shape}")
            with single_blas_thread():
                self._fits[rotated] = fit_gaussian(self._array, rotated=rotated)
        return self._fits[rotated]

    def with_heatmap(self, heatmap: torch.Tensor, num_samples: int | None = None) -> ERFResult:
        """This result with another map (same layer, unit and TRF; ``num_samples`` images if
        given), measured afresh: no metric cached from this map carries over (bootstrap
        resamples and the all-reduced map of a distributed probe are built this way)."""
        return dataclasses.replace(
            self,
            heatmap=heatmap,
            num_samples=self.num_samples if num_samples is None else num_samples,
            per_sample=None,
            field=None,
            _fits={},
        )

    # -- export -----------------------------------------------------------------------------
    def scalars(self, names: Iterable[str] | None = None) -> dict[str, float]:
        """Flat dict of the scalar metrics, as logged (keys are stable across backends).

        Args:
            names: which metrics: keys, shell patterns of keys (``"disc_mass_r*"``) or group
                names of :data:`METRIC_GROUPS` (``"extent"``, ``"openerf"``...); metrics not
                asked for are not computed. ``None``: every metric.

        Raises:
            ValueError: a name that is neither a group nor a key.
        """
        getters = self._getters()
        if names is None:
            wanted = list(getters)
        else:
            patterns = select_metrics(names)
            wanted = [k for k in getters if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
        with single_blas_thread():
            out = {k: getters[k]() for k in wanted}
        if "border_ratio" in out and math.isnan(out["border_ratio"]):
            del out["border_ratio"]
        return out

    # -- display ----------------------------------------------------------------------------
    def plot(self, **kwargs: Any) -> Figure:
        """This layer's map as a matplotlib figure (:func:`~erf_monitor.viz.render.erf_figure`:
        TRF box, 95%-mass square, colour bar; keyword arguments are passed on), to adjust and
        save (``fig.savefig("erf.pdf")``)."""
        from erf_monitor.viz.render import erf_figure

        return erf_figure([self], **kwargs)

    def _repr_html_(self) -> str:
        from erf_monitor.measure.display import result_html

        return result_html(self)

    def _repr_png_(self) -> bytes:
        from erf_monitor.measure.display import result_png

        return result_png(self)

    def _getters(self) -> dict[str, Callable[[], float]]:
        """Every scalar's key and how to compute it (nothing is computed here)."""
        nd = self.heatmap.dim()
        names = axis_names(nd)
        out: dict[str, Callable[[], float]] = {}
        trf = self.trf
        if trf is not None:
            finite = [s for s in trf.size if math.isfinite(s)]
            if finite and not trf.is_global:
                out["trf_size"] = lambda: float(max(finite))
            if not trf.data_dependent:  # data-dependent: no finite size at all
                out["trf_size_clipped"] = lambda: float(max(trf.clipped_size))
            out["trf_global"] = lambda: float(trf.is_global)
            out["trf_data_dependent"] = lambda: float(trf.data_dependent)
        out["erf_size"] = lambda: float(self.erf_size)
        out["erf_trf_ratio"] = lambda: float(self.ratio)
        out["coverage"] = lambda: float(self.coverage)
        for t in AREA_THRESHOLDS:
            out[f"area_t{round(t * 100):02d}"] = partial(self.area_ratio, t)
        for i, axis in enumerate(names):
            out[f"sigma_{axis}"] = partial(self._nth, "sigma", i)
            out[f"centroid_offset_{axis}"] = partial(self._nth, "centroid_offset", i)
        out["gaussian_r2"] = lambda: float(self.gaussian_r2)
        # OpenERF's metrics: disc masses at its radii that fit in the map, the Gaussian fit.
        for k, r in enumerate(self._geometry.radii):
            out[f"disc_mass_r{r}"] = partial(self._disc, k)
        if nd == 2:
            out["gauss_fit_amplitude"] = partial(self._fit_value, "amplitude", 0)
            for i, axis in enumerate(names):
                out[f"gauss_fit_sigma_{axis}"] = partial(self._fit_value, "sigma", i)
                out[f"gauss_fit_offset_{axis}"] = partial(self._fit_value, "offset", i)
            out["gauss_fit_r2"] = partial(self._fit_value, "r2", 0)
        out["coverage_trf"] = lambda: float(self.coverage_trf)
        out["erf_size_visible"] = lambda: float(self.visible_size)
        out["sigma_major"] = lambda: float(self.principal_axes[0][0])
        out["sigma_minor"] = lambda: float(self.principal_axes[0][-1])
        out["anisotropy"] = lambda: float(self.anisotropy)
        if nd == 2:
            out["axis_angle"] = lambda: float(self.principal_axes[1])
        if nd >= 2:
            out["cross_score"] = lambda: float(self.cross_score)
        out["dead_fraction"] = lambda: float(self.dead_fraction)
        for i, axis in enumerate(names):
            out[f"gridding_period_{axis}"] = partial(self._nth, "gridding_period", i)
        field = self.field
        if field is not None:
            out["border_ratio"] = lambda: float(field.border_ratio)
        return out

    def _nth(self, attr: str, i: int) -> float:
        return float(getattr(self, attr)[i])

    def _disc(self, k: int) -> float:
        return float(_prof.disc_fractions(self._profiles)[0, k])

    def _fit_value(self, what: str, i: int) -> float:
        fit = self._frame_fit(False)
        if what == "offset":
            return fit.centre[i] - self._frame.centre[i]
        value = getattr(fit, what)
        return float(value[i] if isinstance(value, tuple) else value)

    def __repr__(self) -> str:
        trf = str(self.trf) if self.trf is not None else "TRF(unknown)"
        where = "" if self.position == "centre" else f" at {self.position} {self.output_index}"
        return (
            f"ERFResult({self.name!r}{where}, mode {self.mode}, map {tuple(self.heatmap.shape)}, "
            f"{trf}, "
            f"erf_size={self.erf_size}, ratio={self.ratio:.3f}, coverage={self.coverage:.3f})"
        )


class _Keyed(Mapping[str, ERFResult]):
    """A read-only ``{key: ERFResult}`` whose missing key says what it is (``_missing``)."""

    _missing = "key"

    def __init__(self, results: Mapping[str, ERFResult]) -> None:
        self._results = dict(results)

    def __getitem__(self, key: str) -> ERFResult:
        try:
            return self._results[key]
        except KeyError:
            raise KeyError(f"No {self._missing} {key!r}; have {list(self._results)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)


class ERFResults(_Keyed):
    """Ordered mapping ``layer name -> ERFResult`` returned by :func:`compute_erf`."""

    _missing = "result for layer"

    def scalars(self, names: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
        """``{layer: result.scalars(names)}`` for every layer, plus
        ``{"<layer>/<position>": ...}`` for every position other than the centre (the logged
        keys' middle part); ``names`` as :meth:`ERFResult.scalars`."""
        names = None if names is None else list(names)
        return {path: r.scalars(names) for path, r in self.flat().items()}

    def flat(self) -> dict[str, ERFResult]:
        """Every result by its key path: ``"<layer>"`` for the centre unit, else
        ``"<layer>/<position>"`` (each position of a field included)."""
        out: dict[str, ERFResult] = {}
        for name, r in self._results.items():
            for x in r.field.values() if r.field is not None else (r,):
                out[name if x.position == "centre" else f"{name}/{x.position}"] = x
        return out

    def plot(self, **kwargs: Any) -> Figure:
        """Every layer's map in one matplotlib figure, a panel per layer
        (:func:`~erf_monitor.viz.render.erf_figure`; keyword arguments such as ``log_scale``,
        ``ncols`` or ``title`` are passed on), to adjust and save."""
        from erf_monitor.viz.render import erf_figure

        return erf_figure(self, **kwargs)

    def _repr_html_(self) -> str:
        from erf_monitor.measure.display import results_html

        return results_html(self)

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(r) for r in self._results.values())
        return f"ERFResults(\n  {inner}\n)"


class ERFField(_Keyed):
    """One layer's ERF results at several positions: ``{position key: ERFResult}``.

    Ordered as requested, the centre unit (key ``"centre"``) first. Several keys may name
    the same output unit (a grid larger than a small output): they share one measurement.

    Attributes:
        grid: ``(k, k)`` for a ``k x k`` grid request, else ``None``.
    """

    _missing = "position"

    def __init__(self, results: Mapping[str, ERFResult], grid: tuple[int, ...] | None = None):
        super().__init__(results)
        self.grid = grid

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}: {r.erf_size}" for k, r in self._results.items())
        return f"ERFField({self.centre.name!r}, erf_size {{{sizes}}})"

    @property
    def centre(self) -> ERFResult:
        """The centre unit's result (the layer's result in ``compute_erf``'s mapping)."""
        return self._results["centre"]

    def at(self, index: tuple[int, ...]) -> ERFResult:
        """The result of output unit ``index`` (non-negative, as :attr:`ERFResult.output_index`)."""
        for r in self._results.values():
            if r.output_index == tuple(index):
                return r
        raise KeyError(f"No position at output index {tuple(index)} in this field")

    @property
    def corners(self) -> list[ERFResult]:
        """Results of the output plane's corner units (first or last index on every axis),
        one per unit."""
        grid = self.centre.output_shape
        seen: dict[tuple[int, ...], ERFResult] = {}
        for r in self._results.values():
            idx = r.output_index
            if grid and all(i in (0, s - 1) for i, s in zip(idx, grid)):
                seen.setdefault(idx, r)
        return list(seen.values())

    @property
    def border_ratio(self) -> float:
        """Mean visible ERF size of the corner units over the centre unit's.

        The visible size (:attr:`ERFResult.visible_size`) is the side of the 95%-mass
        square as the image clips it: a corner unit's square is cut by two borders. About
        0.5 in 2-D when a corner unit's ERF reaches as far from it as the centre unit's
        does (a quarter of it is inside the image), 1 when the ERFs are small enough for
        the border not to matter; below 0.5 when the padding also shrinks the corner
        unit's ERF. NaN when the field has no corner unit (e.g. ``"edges"``) or the centre
        unit's map is zero.
        """
        corners = self.corners
        centre = self.centre.visible_size
        if not corners or centre == 0:
            return math.nan
        return float(np.mean([r.visible_size for r in corners])) / centre

    def figure(self, **kwargs: Any) -> Figure:
        """The field figure (:func:`erf_monitor.viz.field.field_figure`)."""
        from erf_monitor.viz.field import field_figure

        return field_figure(self, **kwargs)

    def plot(self, **kwargs: Any) -> Figure:
        """The field figure, like :meth:`figure` (the name the other results use)."""
        return self.figure(**kwargs)

    def _repr_html_(self) -> str:
        from erf_monitor.measure.display import field_html

        return field_html(self)

    def _repr_png_(self) -> bytes | None:
        from erf_monitor.measure.display import field_png

        return field_png(self)
