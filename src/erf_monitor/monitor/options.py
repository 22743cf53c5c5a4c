"""``MonitorOptions``: the options every monitoring front-end shares, documented once.

``ERFMonitor`` (Lightning), ``watch``/``Watcher`` (plain PyTorch) and the other integrations
each take ``options=MonitorOptions(...)`` and/or the same fields as keyword arguments
(typed through :class:`MonitorKwargs`), plus the few arguments that only make sense for
them (a Trainer's loggers, an optimizer...). Validation happens here, when the options are
built, so a wrong value fails at construction with the field's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from typing_extensions import TypedDict

from erf_monitor.core.modes import Mode, check_mode
from erf_monitor.inputs.batch import InputKey
from erf_monitor.monitor.alerts import DEFAULT_PATIENCE, DEFAULT_WARMUP_STEPS
from erf_monitor.sinks import DEFAULT_METRICS, MetricSelection, check_metrics
from erf_monitor.targets.observe import ForwardFn
from erf_monitor.targets.positions import PositionSpec, check_position
from erf_monitor.targets.tokens import TokenLayoutArg, check_token_layout

__all__ = [
    "DEFAULT_METRICS",
    "DEFAULT_MIN_COVERAGE",
    "DistributedProbe",
    "LayerSpec",
    "MinCoverage",
    "MonitorKwargs",
    "MonitorOptions",
    "OnInsufficient",
    "ProbeInputs",
]

#: Default ``min_coverage``: the 95%-mass square must cover at least 5% of the input area.
DEFAULT_MIN_COVERAGE: float = 0.05

LayerSpec = str | Sequence[str]
OnInsufficient = Literal["warn", "raise", "stop"]
ProbeInputs = Literal["train", "val", "noise"] | torch.Tensor
MinCoverage = float | Mapping[str, float] | None
DistributedProbe = bool | Literal["auto"]


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (a fraction of the input area), got {value}")
    return float(value)


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class MonitorOptions:
    """What to probe, when, and what to do about it: shared by every monitoring front-end.

    Pass it as ``options=`` to :class:`~erf_monitor.ERFMonitor`, :func:`~erf_monitor.watch`
    (and the other integrations), or pass the same names as keyword arguments; keyword
    arguments override the fields of ``options``. Values are checked when the options are
    built (``ValueError``/``TypeError`` naming the field).

    **Coverage alert.** ``coverage`` is the fraction of the input area inside the square that
    holds 95% of the ERF's mass. An ERF at initialisation is small and training grows it, so a
    checked layer below its threshold is judged by what training can still do (see
    :class:`~erf_monitor.monitor.alerts.AlertPolicy`):

    * its clipped TRF alone covers less than the threshold: no training can fix that, the
      alert fires at once (at the first probe);
    * otherwise it fires during training only once the ERF has had its chance: ``patience``
      consecutive probes below the threshold, at or after step ``alert_warmup``, and a trend
      over those probes that does not reach the threshold within as many steps again as were
      trained so far;
    * and always at the end of training (after the final probe) if the last probe is still
      below the threshold.

    An alert (once per layer) is an :class:`~erf_monitor.ERFCoverageWarning` (two lines: the
    numbers, then what to try, reported at your ``trainer.fit(...)`` / ``optimizer.step()``
    line), an alert in every sink, and, during training, ``on_insufficient``; ``alerts`` then
    maps the layer to that step. A float
    ``min_coverage`` checks only the **deepest watched layer** (the one that runs last; early
    stages never cover the image, so they are watched, not judged); a mapping
    ``{name or glob: threshold}`` checks exactly the layers it names (globs as in ``layers``:
    ``*`` and ``?`` within one dotted segment, ``**`` across; the first key that matches a layer
    gives its threshold); ``None`` turns alerts off. The default 0.05 (the 95%-mass square spans
    >= 5% of the image, e.g. 50x50 px of a 224x224 input) is deliberately low: healthy backbones
    exceed it by far at their last stage, so it fires only when a layer really sees just a small
    patch. When a checked layer's theoretical receptive field is smaller than the input, that is
    logged once as information (logger ``"erf_monitor"``), not warned about.
    ``patience=1, alert_warmup=0`` alerts at the first probe below the threshold.

    **Probe batch.** ``"train"`` keeps the first ``num_samples`` images of the first training
    batch (a detached CPU copy, never the training tensor itself); ``"val"`` the first
    validation batch (Lightning only); ``"noise"`` standard Gaussian noise of the training
    images' shape (Luo et al.), seeded by ``seed``; or a tensor ``(N, C, *spatial)``. Neither
    capturing nor probing advances a dataloader or any global RNG.

    **Distributed runs.** By default global rank 0 probes alone (no collective, nothing to
    wait for). When the parameters are sharded (FSDP2 ``fully_shard``), every rank must take
    part in every forward, so every rank probes its share of the probe batch and one
    all-reduce sums the maps (see the guide "Sharded models (FSDP2)");
    ``distributed_probe=True`` asks for the same under DDP (the probe's work is split over the
    ranks); ``False`` refuses sharded models (rank 0 alone would wait forever for the others).

    Attributes:
        layers: layer names as in ``model.named_modules()``, globs (``"backbone.layer*"``),
            or ``"auto"`` (one layer per spatial resolution stage).
        every_n_steps: probe every this many optimizer steps (and once at the start and once
            at the end of training).
        num_samples: probe batch size (the ERF map is the mean over these samples).
        min_coverage: alert threshold(s), see above; ``None`` disables alerts.
        patience: consecutive probes below the threshold (the step-0 probe included) before
            an alert during training; a TRF that is too small alerts at once.
        alert_warmup: no alert during training before this optimizer step (default 1000),
            unless the TRF is too small; the end of training always decides.
        on_insufficient: ``"warn"`` (warning and logged alert only), ``"stop"`` (ask the
            loop to stop: ``trainer.should_stop``, ``Watcher.should_stop``...) or ``"raise"``
            (raise the :class:`~erf_monitor.ERFCoverageWarning`). An alert at the end of
            training is logged first; ``"raise"`` then raises it (on every rank), ``"stop"``
            has nothing left to stop.
        probe_inputs: ``"train"``, ``"val"``, ``"noise"`` or a tensor ``(N, C, *spatial)``.
        input_key: where the image is in a batch (dict key, tuple index or
            ``fn(batch) -> tensor``); default: found automatically.
        forward_fn: ``forward_fn(model, images)`` runs the model on an image batch, for
            models whose ``forward`` does not take the image directly (default
            ``model(images)``).
        mode: ``"luo"``, ``"replknet"`` or ``"openerf"``: the ERF convention (see
            :func:`~erf_monitor.compute_erf`).
        chunk_size: probe at most this many samples at a time (bounds memory).
        seed: seed of the ``"noise"`` probe batch.
        prefix: top-level key of everything logged (``"erf"``).
        render_kwargs: options for the heatmap images (``cmap``, ``log_scale``...).
        strict: re-raise failures inside the monitor instead of warning once and going on.
        summary: print a table at the end of training (per layer: first -> last ERF size,
            ERF/TRF ratio and coverage, the threshold and when its alert fired); ``False``
            turns it off.
        token_layout: how token outputs of transformer layers map onto the patch grid (see
            :func:`~erf_monitor.compute_erf`; torchvision/timm ViTs need none).
        distributed_probe: ``"auto"`` (every rank probes its share when the parameters are
            sharded, else rank 0 alone), ``True`` (every rank probes its share, also under
            DDP) or ``False`` (rank 0 alone; sharded models are refused).
        position: which output unit(s) to probe, as in :func:`~erf_monitor.compute_erf`:
            ``"centre"`` (default), an index ``(0, -1)``, a fraction ``(0.0, 0.5)``, or a
            set (``"corners"``, ``"edges"``, ``"grid:5"``, a list). Metrics of other units
            than the centre are logged as ``<prefix>/<layer>/<position>/<metric>`` (e.g.
            ``erf/layer4/corner_top_left/coverage``); with a set the centre's stay at
            ``<prefix>/<layer>/<metric>`` with ``border_ratio``, the field figure at
            ``<prefix>/<layer>/field``, and the coverage alert watches the centre unit.
        metrics: which metrics are logged per layer: ``None`` (default) for the few that
            matter, :data:`DEFAULT_METRICS` (``erf_size``, ``coverage``, ``erf_trf_ratio``,
            ``area_t50``, ``sigma_y/x``, ``centroid_offset_y/x``; ``border_ratio`` with a
            set of positions); ``"all"`` for every metric of ``ERFResult.scalars()``; or a
            list of names (``["coverage", "gaussian_r2", "area_t*"]``; per-axis metrics by
            their base name, ``"sigma"``). Metrics not logged are not computed, except the
            cheap ones the monitor's ``history`` keeps for its summary and reports (TRF
            sizes, extents and area ratios, moments). The table of keys is in the Lightning
            guide ("Logged keys").

    Examples:
        >>> import erf_monitor as em
        >>> opts = em.MonitorOptions(layers=["layer4"], every_n_steps=200)
        >>> opts.num_samples, opts.min_coverage
        (8, 0.05)
        >>> opts.replace(num_samples=16).num_samples
        16
        >>> em.MonitorOptions(patience=0)
        Traceback (most recent call last):
        ...
        ValueError: patience must be >= 1, got 0
    """

    layers: LayerSpec = "auto"
    every_n_steps: int = 500
    num_samples: int = 8
    min_coverage: MinCoverage = DEFAULT_MIN_COVERAGE
    patience: int = DEFAULT_PATIENCE
    alert_warmup: int = DEFAULT_WARMUP_STEPS
    on_insufficient: OnInsufficient = "warn"
    probe_inputs: ProbeInputs = "train"
    input_key: InputKey = None
    forward_fn: ForwardFn | None = None
    mode: Mode = "luo"
    chunk_size: int | None = None
    seed: int = 0
    prefix: str = "erf"
    render_kwargs: Mapping[str, Any] = field(default_factory=dict)
    strict: bool = False
    token_layout: TokenLayoutArg = None
    distributed_probe: DistributedProbe = "auto"
    summary: bool = True
    position: PositionSpec = "centre"
    metrics: MetricSelection = None

    def __post_init__(self) -> None:
        # Normalise in place (frozen: through object.__setattr__) so that the engine can rely
        # on plain types: a tuple of layer names, a float or dict threshold, a dict of kwargs.
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        layers = self.layers
        if not isinstance(layers, str):
            seq = list(layers)
            if not seq:
                raise ValueError("layers is empty: pass layer names, globs, or 'auto'.")
            for spec in seq:
                if not isinstance(spec, str):
                    raise TypeError(f"Layer names must be strings, got {spec!r}")
            put("layers", tuple(seq))
        _check_int("every_n_steps", self.every_n_steps)
        _check_int("num_samples", self.num_samples)
        _check_int("patience", self.patience)
        _check_int("alert_warmup", self.alert_warmup, minimum=0)
        if self.chunk_size is not None:
            _check_int("chunk_size", self.chunk_size)
        cov = self.min_coverage
        if isinstance(cov, Mapping):
            put(
                "min_coverage",
                {str(k): _check_fraction(f"min_coverage[{k!r}]", v) for k, v in cov.items()},
            )
        elif cov is not None:
            put("min_coverage", _check_fraction("min_coverage", cov))
        if self.on_insufficient not in ("warn", "raise", "stop"):
            raise ValueError(
                f"on_insufficient must be 'warn', 'raise' or 'stop', got {self.on_insufficient!r}"
            )
        probe = self.probe_inputs
        if isinstance(probe, torch.Tensor):
            if not probe.is_floating_point() or probe.dim() < 3:
                raise ValueError(
                    "probe_inputs tensor must be a floating-point batch (N, C, *spatial); got "
                    f"{probe.dtype} of shape {tuple(probe.shape)}"
                )
        elif probe not in ("train", "val", "noise"):
            raise ValueError(
                "probe_inputs must be 'train', 'val', 'noise' or a tensor (N, C, *spatial), "
                f"got {probe!r}"
            )
        key = self.input_key
        if key is not None and not (callable(key) or isinstance(key, (str, int))):
            raise TypeError(f"input_key must be a str, an int or a callable, got {key!r}")
        if self.forward_fn is not None and not callable(self.forward_fn):
            raise TypeError(f"forward_fn must be callable(model, x), got {self.forward_fn!r}")
        check_mode(self.mode)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.prefix, str) or not self.prefix:
            raise ValueError(f"prefix must be a non-empty string, got {self.prefix!r}")
        put("render_kwargs", dict(self.render_kwargs or {}))
        put("strict", bool(self.strict))
        put("summary", bool(self.summary))
        check_token_layout(self.token_layout)
        if not (isinstance(self.distributed_probe, bool) or self.distributed_probe == "auto"):
            raise ValueError(
                f"distributed_probe must be 'auto', True or False, got {self.distributed_probe!r}"
            )
        check_position(self.position)
        if isinstance(self.position, list):  # frozen options: keep it immutable
            put("position", tuple(self.position))
        put("metrics", check_metrics(self.metrics))

    @property
    def source(self) -> str:
        """Where the probe batch comes from: ``"train"``, ``"val"``, ``"noise"`` or ``"tensor"``."""
        return "tensor" if isinstance(self.probe_inputs, torch.Tensor) else str(self.probe_inputs)

    def replace(self, **changes: Any) -> MonitorOptions:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(
        cls,
        options: MonitorOptions | None,
        overrides: Mapping[str, Any],
        defaults: Mapping[str, Any] | None = None,
        *,
        layers: LayerSpec | None = None,
    ) -> MonitorOptions:
        """Options for a front-end: ``options`` (or the defaults) with ``overrides`` applied.

        ``defaults`` are a front-end's own defaults, used only when no ``options`` is given;
        ``layers`` (a front-end's positional argument) overrides too unless it is ``None``.
        Unknown names raise ``TypeError`` listing the valid ones.
        """
        if layers is not None:
            overrides = {**overrides, "layers": layers}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(
                f"Unknown option(s) {unknown}; MonitorOptions fields are {sorted(names)}."
            )
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options must be a MonitorOptions, got {type(options).__name__}")
        base = options if options is not None else cls(**dict(defaults or {}))
        return base.replace(**overrides) if overrides else base


class MonitorKwargs(TypedDict, total=False):
    """The fields of :class:`MonitorOptions` other than ``layers``, as keyword arguments.

    Typing only (``**kwargs: Unpack[MonitorKwargs]``): see :class:`MonitorOptions` for what
    each one means. A test keeps the two in step.
    """

    every_n_steps: int
    num_samples: int
    min_coverage: MinCoverage
    patience: int
    alert_warmup: int
    on_insufficient: OnInsufficient
    probe_inputs: ProbeInputs
    input_key: InputKey
    forward_fn: ForwardFn | None
    mode: Mode
    chunk_size: int | None
    seed: int
    prefix: str
    render_kwargs: Mapping[str, Any]
    strict: bool
    token_layout: TokenLayoutArg
    distributed_probe: DistributedProbe
    summary: bool
    position: PositionSpec
    metrics: MetricSelection
