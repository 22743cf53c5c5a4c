"""The probe's entry points: :func:`compute_erf` and :func:`theoretical_rf`.

Both read as the pipeline: build (or reuse) the plan — targets, TRFs, seed units, crop
groups, dtype (:mod:`erf_monitor.probe.plan`) — then probe (:mod:`erf_monitor.probe.run`)
and measure (:mod:`erf_monitor.probe.results`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from erf_monitor.core.devices import model_device_dtype
from erf_monitor.core.hints import check_not_meta
from erf_monitor.core.index import ModelIndex, model_index
from erf_monitor.core.modes import Mode, check_mode
from erf_monitor.core.probing import probing
from erf_monitor.core.rng import preserved_rng
from erf_monitor.core.warn import reissue
from erf_monitor.measure.result import ERFResults
from erf_monitor.probe.crop import CropOption
from erf_monitor.probe.plan import (
    GivenTRF,
    ProbePlan,
    cached_plan,
    probe_dtype,
    probe_state,
)
from erf_monitor.probe.results import build_results
from erf_monitor.probe.run import run_plan
from erf_monitor.targets.layers import unwrap_model
from erf_monitor.targets.observe import ForwardFn
from erf_monitor.targets.positions import PositionSpec, check_position, request
from erf_monitor.targets.tokens import TokenLayout
from erf_monitor.trf.types import TRF

__all__ = ["CropOption", "ForwardFn", "compute_erf", "probe", "theoretical_rf"]


def _non_finite_error(inputs: torch.Tensor) -> ValueError:
    bad = (~torch.isfinite(inputs.detach())).flatten(1).any(1).nonzero().flatten().tolist()
    shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
    return ValueError(
        f"The probe input of shape {tuple(inputs.shape)} contains NaN or Inf values (in "
        f"sample(s) {shown}): an ERF of non-finite inputs means nothing, so none is computed. "
        "Probe finite images."
    )


def probe_input(inputs: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``inputs`` checked and copied for a probe: on ``device``, in ``dtype``, detached."""
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() < 3:
        raise ValueError(
            f"compute_erf needs a batch (N, C, *spatial) with 1 to 3 spatial dims; got shape "
            f"{tuple(inputs.shape)}, which has no spatial dims. Add the batch/channel dims "
            "(e.g. x[None] or x[:, None])."
        )
    if inputs.dim() > 5:
        raise ValueError(f"At most 3 spatial dims are supported; got shape {tuple(inputs.shape)}.")
    if not inputs.is_floating_point():
        raise TypeError(
            f"inputs must be floating point, got {inputs.dtype}: convert images first, e.g. "
            "x.float() / 255 and the model's normalisation (erf_monitor.load_images does both)."
        )
    if inputs.shape[0] == 0:
        raise ValueError("The probe batch is empty.")
    if inputs.numel() and not bool(torch.isfinite(inputs.detach()).all()):
        raise _non_finite_error(inputs)
    # Cloning outside inference mode turns an inference tensor into a normal leaf.
    with torch.inference_mode(False):
        x = inputs.detach().to(device=device, dtype=dtype).clone()
    if not bool(torch.isfinite(x).all()):  # finite values that overflow the probe dtype
        raise _non_finite_error(x)
    return x


def probe(
    plan: ProbePlan,
    model: nn.Module,
    x: torch.Tensor,
    *,
    chunk_size: int | None = None,
    keep_per_sample: bool = False,
    index: ModelIndex | None = None,
) -> ERFResults:
    """Probe ``x`` (from :func:`probe_input`) with a plan built for ``model``: run, measure.
    ``index``: the unwrapped model's index, when the caller took it already."""
    net = unwrap_model(model)
    if index is None or index.model is not net:
        index = model_index(net)
    with probing(), probe_state(net, plan.train_mode, x.device, index):
        maps = run_plan(
            plan, net, x, chunk_size=chunk_size, keep_per_sample=keep_per_sample, index=index
        )
    return build_results(plan, maps, x.shape[0], keep_per_sample)


def compute_erf(
    model: nn.Module,
    inputs: torch.Tensor,
    layers: str | Sequence[str] = "auto",
    *,
    mode: Mode = "luo",
    num_samples: int | None = None,
    chunk_size: int | None = None,
    forward_fn: ForwardFn | None = None,
    train_mode: bool = False,
    dtype: torch.dtype | None = None,
    keep_per_sample: bool = False,
    trf: Mapping[str, GivenTRF] | Literal["auto", "skip"] = "auto",
    crop: CropOption = "auto",
    token_layout: TokenLayout | Mapping[str, TokenLayout] | None = None,
    position: PositionSpec = "centre",
) -> ERFResults:
    """ERF maps of several layers from one probe, at the centre unit or any other units.

    Args:
        model: any ``nn.Module`` (a ``torch.compile``'d one is probed eagerly; a
            ``DataParallel``/DDP wrapper through the module it wraps, which ``forward_fn``
            then receives).
        inputs: probe batch ``(N, C, *S)`` with 1 to 3 spatial dims, finite. Never modified.
        layers: layer names (as in ``model.named_modules()``, optionally followed by an
            output selector such as ``"backbone['0']"`` or ``"stage[0]"`` for modules that
            return tuples, dicts or ``ModelOutput``s), globs, or ``"auto"`` (one layer per
            spatial stage, deepest last; see the Models and layers guide).
        mode: the published convention to follow (exact definitions in
            ``docs/concepts.md``; every result records it): ``"luo"`` (Luo et al.: mean over
            samples of the channel-summed ``|gradient|``), ``"replknet"`` (RepLKNet's
            ``visualize_erf.py`` + ``analyze_erf.py``: relu seed, channel sum of the relu'd
            gradient, mean over samples, then ``log10(x + 1) / max``) or ``"openerf"``
            (OpenERF / Kim et al. 2023: channel-mean seed, upper-left central token on even
            token grids, clamped channel mean of the gradient, normalised to total mass 1).
        num_samples: use only the first ``num_samples`` of ``inputs``.
        chunk_size: probe at most this many samples at a time (bounds memory; maps are
            accumulated exactly). Default ``None``: at most 32 samples and at most about
            2**20 input pixels per chunk on CPU (2**22 elsewhere): larger CPU batches of
            large images were measured to run up to 2x slower per sample, and memory stays
            bounded for probes of many samples.
        forward_fn: ``forward_fn(model, x)`` runs the model on an image batch (default
            ``model(x)``); for models whose ``forward`` does not take the image directly.
        train_mode: probe in train mode. Then BatchNorm mixes samples (maps are no longer
            per-sample) and dropout is active; buffers and RNG are still restored.
        dtype: dtype of the probe; default the parameters' dtype (float32 or float64),
            float32 for a float16 or bfloat16 model (probed with float32 copies of its
            weights, so that its maps are exact; ``dtype=torch.bfloat16`` probes in the
            model's own arithmetic) and for a model without floating-point parameters. The
            model is not cast: a float64 probe needs a float64 model. Autocast is disabled
            during the probe. A layer whose seed cancels in float32 (a channel sum after a
            LayerNorm, e.g. a ConvNeXt stage at initialisation) is probed again in float64 on
            its own, so that its map is exact (docs/concepts.md, "Precision").
        keep_per_sample: also return the per-sample maps ``(N, *S)`` (before the mode's
            normalisation over samples).
        trf: precomputed TRFs per layer (from :func:`theoretical_rf` with the same ``mode``,
            input shape and position; several per layer for several positions; others are
            warned about and not used), ``"auto"`` to compute them, or ``"skip"`` not to
            report or use any (``ratio`` is then NaN and nothing is cropped). Metrics do not
            depend on this choice: they are centred on the seed unit's theoretical centre,
            which comes from the layer geometry in every case.
        crop: run each layer's forward and backward on a stride-aligned crop of the input
            that contains its TRF (exact: nothing outside the TRF reaches the seed unit).
            ``"auto"`` crops where the window is clearly smaller than the input and shares
            windows between layers (and between the positions of a layer) where that is
            cheaper; ``True`` crops every layer and position that can be cropped, each to
            its own window; ``False`` never crops. In a model that pads from its input's
            size (timm's ``Conv2dSame``, ``MaxPool2dSame``, ``AvgPool2dSame``) a window
            keeps the input's size modulo the stride, so that it is padded the same way.
            Layers with a global, non-local or unknown TRF (``trf="skip"``), and
            ``train_mode``, always use the full input.
        token_layout: how token outputs map onto the patch grid: one
            :class:`~erf_monitor.TokenLayout` for every layer with a token output, or
            ``{layer or glob: TokenLayout}``. Token sequences ``(N, L, D)`` of
            torchvision/timm ViTs and of grids that the shapes determine uniquely are mapped
            automatically, and so are channels-last (Swin-style) outputs ``(N, H', W', C)``
            whose shape or model tells their layout (else an error asks for
            ``TokenLayout(channels_last=True)`` or ``TokenLayout(channels_last=False)``). The
            seed is the centre patch token.
        position: which output unit of each layer is seeded (``docs/guides/positions.md``):
            ``"centre"`` (default); an output index per spatial dim, ``(0, -1)`` (negative
            from the end); a fraction of the output plane per dim, ``(0.0, 0.5)`` (index
            ``min(floor(f * S'), S' - 1)``; an int is an index, a float a fraction); or a
            set: ``"corners"``, ``"edges"``, a ``k x k`` grid ``"grid:k"`` / ``("grid", k)``,
            or a list of positions. A set is probed in one forward per layer (units with
            disjoint TRFs share a backward); each result's metrics are centred on its own
            unit's theoretical centre.

    Returns:
        An ordered mapping ``layer -> ERFResult``. With one position, each layer's result
        is that unit's (``result.position``, ``result.output_index``); with a set, it is
        the centre unit's and ``result.field`` maps every position's key (the centre
        included) to its result, with ``field.border_ratio`` and ``field.figure()``.

    Raises:
        ValueError: unknown layer, a layer not reached, input without spatial dims or with
            NaN/Inf values, an output that is not conv-like.
        ERFProbeError: the forward failed, or the seed unit or a gradient contains NaN/Inf.

    Every random stream (torch CPU/CUDA, Python ``random``, NumPy's global generator) is left
    as it was. Each map is checked against its layer's TRF: mass outside a finite clipped TRF
    means the TRF is wrong, so it is reported unknown (``trf`` ``None``, ``trf_issue`` says
    why) with an :class:`~erf_monitor.ERFProbeWarning` naming the layer and the amount.

    Examples:
        >>> import torch, erf_monitor as em
        >>> net = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3, padding=1) for _ in range(2)])
        >>> res = em.compute_erf(net, torch.randn(2, 1, 9, 9), layers=["0", "1"])
        >>> res["1"].heatmap.shape, res["1"].trf.size
        (torch.Size([9, 9]), (5.0, 5.0))
        >>> bool(res["1"].heatmap[0, 0] == 0)  # outside the 5x5 TRF: no influence at all
        True
    """
    mode = check_mode(mode)
    check_position(position)
    if crop not in (True, False, "auto"):
        raise ValueError(f"crop must be True, False or 'auto', got {crop!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    net = unwrap_model(model)
    index = model_index(net)  # the one walk of the model's modules: every stage reads it
    check_not_meta(index, inputs)
    device, param_dtype = model_device_dtype(index)
    device = inputs.device if device is None else device
    with probing(), preserved_rng(device):  # (probing first: one probe at a time)
        x = probe_input(inputs[:num_samples], device, probe_dtype(dtype, param_dtype))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = cached_plan(
                model, x, layers=layers, mode=mode, position=position,
                token_layout=token_layout, forward_fn=forward_fn, trf=trf, crop=crop,
                train_mode=train_mode, index=index,
            )  # fmt: skip
        reissue(caught)  # at the user's line
        return probe(
            plan, model, x, chunk_size=chunk_size, keep_per_sample=keep_per_sample, index=index
        )


def theoretical_rf(
    model: nn.Module,
    input_shape: Sequence[int],
    layers: Sequence[str] | str,
    *,
    method: Literal["auto", "fx", "numeric"] = "auto",
    forward_fn: ForwardFn | None = None,
    token_layout: TokenLayout | Mapping[str, TokenLayout] | None = None,
    mode: str = "luo",
    position: Any = "centre",
) -> dict[str, TRF]:
    """Theoretical receptive field of the centre unit (or another unit) of each layer.

    For each layer the output of the module's *first* call in the forward is taken as
    ``(N, C, *S')``; its centre unit sits at ``c' = S'_d // 2`` per spatial dim (for even sizes
    the lower-right of the central units). Per spatial dim the result holds the unclipped
    inclusive input interval the unit sees (as if the input plane were infinite), its size,
    the effective stride (input pixels between neighbouring output units; fractional after
    upsampling or transposed convolutions), the exact clipped hull of in-bounds input
    indices that can influence the unit (padding accounted for layer by layer), and whether
    a global operation (global pooling, squeeze-excitation gating, flatten + linear,
    attention, normalisation over space) makes the dim global. Branches (residual adds,
    concatenation) take the union over paths. Outputs with no spatial dims, ``(N, K)``, and
    outputs whose rank does not match the input's (token sequences), are one unit: every
    dim is global.

    Methods:

    * ``"fx"``: trace with :mod:`torch.fx` (the model in eval mode, shapes propagated on a
      zeros input of batch 1 on the model's device; every module's ``training`` flag is
      restored) and walk index boxes backward from the layer's output node. Exact.
    * ``"numeric"``: gradient support of a structural surrogate (a float64 CPU deep copy with
      positive weights, zero biases, neutral BatchNorm, max-pooling replaced by sum-pooling
      of the same geometry and ReLU-like gates by identities), the union over 2 random positive
      inputs.
      It cannot see beyond the input: where the support touches the border the unclipped
      interval is reported equal to the clipped one. Strides come from the support of the
      neighbouring unit (``S_d / S'_d`` where it is clipped or absent). A dim is reported
      global when the output has more than one unit along it and both the centre unit and
      the first unit see the whole input along it (so a finite TRF more than about twice the
      input also looks global), or when the output has no spatial dims.
    * ``"auto"``: ``"fx"``; if tracing fails or an op has no rule, ``"numeric"`` with a
      one-time :class:`~erf_monitor.ERFProbeWarning` naming the reason. A Python loop over
      the input's tokens stops the trace (one op at one module recorded more than 64 times
      beyond once per module inside it): the layers after it are left out of the result,
      with one :class:`~erf_monitor.ERFProbeWarning` naming the op (``"fx"`` traces the
      whole loop, ``"numeric"`` measures it).

    A unit that samples the input at positions computed from the input (deformable
    convolution, ``grid_sample`` with a predicted grid, RoI pooling of predicted boxes, and
    for the numeric method also gathers and indexing with computed indices) has a
    *data-dependent* field: ``data_dependent`` is true, every dim is global and ``reason``
    names the op. Fixed sampling positions (a constant grid) are measured numerically.

    In a global dim ``size`` is ``inf``, ``interval`` is ``(-inf, inf)``, ``clipped`` is the
    hull of the input indices that can influence the unit (normally the whole input) and
    ``centre`` is ``(c' + 0.5) * S_d / S'_d - 0.5``.

    Args:
        model: the model (``torch.compile`` wrappers are unwrapped; it is not modified).
        input_shape: ``(C, *S)`` or ``(N, C, *S)`` with 1 to 3 spatial dims. A 4-tuple is read
            as ``(N, C, H, W)`` when the model's first convolution/pooling is 2-D, and as
            ``(C, D, H, W)`` when it is 3-D (likewise for other lengths).
        layers: layer name(s) as in ``model.named_modules()`` (``_orig_mod.`` segments and a
            wrapper's ``module.`` prefix optional), optionally with an output selector
            (``"backbone['0']"``): the analysis starts from the selected part.
        method: ``"auto"``, ``"fx"`` or ``"numeric"``.
        forward_fn: how to call the model on an image batch, ``forward_fn(model, x)``;
            default ``model(x)``.
        token_layout: as in :func:`~erf_monitor.compute_erf`: token outputs ``(N, L, D)``
            (inferred for ViTs) and channels-last outputs are put on their patch grid and the
            walk starts at the centre patch token, so a patch embedding reports its kernel
            and a layer after attention reports global (both methods).
        mode: the ERF mode whose seed unit is analysed (see
            :func:`~erf_monitor.compute_erf`); only ``"openerf"`` on token outputs with an
            even grid seeds another unit than ``S' // 2`` (the upper-left central token).
        position: the output unit analysed: ``"centre"`` (default), an index tuple such as
            ``(0, -1)`` or a fraction tuple such as ``(0.0, 0.5)`` (one position; see
            :func:`~erf_monitor.compute_erf`). The TRF's ``output_centre`` is that unit,
            ``interval``/``clipped``/``centre`` are its field.

    Every global random stream is left as it was (the analysis runs the model). Layers are
    resolved as :func:`~erf_monitor.compute_erf` resolves them (the same plan), so a
    channels-last stage named explicitly is analysed on its grid, as with ``layers="auto"``.

    Returns:
        ``{layer: TRF}`` in the order of ``layers`` (with ``"auto"``, without the layers
        after a loop that stopped the trace).

    Raises:
        ValueError: unknown layer (close matches listed), a layer the forward never reaches,
            an input shape without spatial dims, or (``method="fx"``) a model the analysis
            cannot follow.

    Examples:
        >>> net = nn.Sequential(
        ...     nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        ... )
        >>> trf = theoretical_rf(net, (3, 32, 32), ["2"])["2"]
        >>> trf.size, trf.stride, trf.interval
        ((5.0, 5.0), (2.0, 2.0), ((14, 18), (14, 18)))
        >>> str(trf)
        'TRF(5 x 5, stride 2 x 2)'
    """
    from erf_monitor.trf.analysis import parse_input_shape

    if method not in ("auto", "fx", "numeric"):
        raise ValueError(f"method must be 'auto', 'fx' or 'numeric', got {method!r}")
    mode = check_mode(mode)
    net = unwrap_model(model)
    index = model_index(net)  # the one walk of the model's modules: every stage reads it
    check_not_meta(index)
    channels, spatial = parse_input_shape(index, input_shape)
    req = request(position, len(spatial))
    if req.is_set:
        raise ValueError(
            f"theoretical_rf takes one position, got the set {position!r}; compute_erf "
            "reports the TRF of every position of a set (ERFResult.field)."
        )
    device, param_dtype = model_device_dtype(index)
    dtype = probe_dtype(None, param_dtype)
    example = torch.zeros((1, channels, *spatial), device=device, dtype=dtype)
    with probing(), preserved_rng(example.device), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = cached_plan(
            model, example, layers=layers, mode=mode, position=position,
            token_layout=token_layout, forward_fn=forward_fn, trf=method, crop=False, index=index,
        )  # fmt: skip
    reissue(caught)  # at the user's line
    key = req.primary.key
    return {name: units[key] for name, units in plan.trfs.items()}
