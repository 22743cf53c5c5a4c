"""``layers="auto"``: one layer per spatial stage, picked from one recorded forward pass.

The rule, in the order it is applied (every step is about the *first* call of a module, the
call that the probe measures):

1. **Grids.** Every tensor inside a module's output (tuples, lists, dicts, ``ModelOutput``s
   are searched; a part one level deep may be picked with an output selector such as
   ``backbone['0']``) is read
   as a map on a spatial *grid* when its layout is known. Modules are read in the order they
   finished (the forward's order), and the layout comes from, first match wins:

   * the module: convolutions, pooling, upsampling and batch/group/instance norms output
     ``(N, C, *S)``;
   * the tensor: the same tensor (or a same-shaped input: elementwise modules and residual
     blocks keep their input's layout) was read before;
   * the block: the last map of the same shape that a convolution or channel norm inside
     the module made (a residual block adds to it or activates it, keeping its shape);
   * a token sequence ``(N, L, D)`` whose patch grid
     :func:`~erf_monitor.targets.tokens.resolve_layout`
     infers (ViT blocks);
   * a channel norm over the last dim (a ``LayerNorm(C)`` applied to ``(N, *S, C)``; not
     ``LayerNorm2d``-style channels-first norms): channels-last;
   * the shape: ``(N, C, *S)`` or channels-last ``(N, *S, C)`` (Swin stages), whichever puts
     the map on a *plausible* grid: the latest grid read, halved or doubled (patch merging,
     an upsampling decoder), or, for one part of a dict/tuple output, any grid read before;
     when both readings are plausible and differ, ``(N, C, *S)``; when they coincide,
     neither (the layout cannot be told).

   Parts with another batch size (windows, RoIs, tables that do not depend on the input: the
   pass runs on two samples), all-ones grids and the input itself are not maps of the input.
2. **Never these:** outputs of LayerNorm/RMSNorm modules and every view of them (a container
   that ends with a channel norm, a ``Permute`` after it: their channel sum is constant, so the
   Luo seed would be rounding noise), adaptive/global pooling outputs, pass-through modules
   (``Identity``, dropout, drop-path: the layer before them is the same map), and modules
   called more than once (a head shared over FPN levels, a ReLU reused inside a block: "first
   call" would be arbitrary there).
3. **Stage outputs, not parts of transitions or heads.** A *layer* (a module with at most one
   level of children, e.g. a conv or a conv-norm-activation, whose children may hold
   parameter-free leaves: timm's ``ConvNormAct`` with its ``BatchNormAct2d``) on grid ``G``
   inside a block that takes ``G`` in and gives another grid out (a stride-2 block's
   expansion conv, a DenseNet transition's 1x1 conv) is skipped (a *block* works on two grids
   besides 1x1 pools; a sub-network, on more, is not one), and so is anything inside a
   *head*, a block that takes maps in and gives no map out (an SSD head's per-level
   convolutions). Plain ``Sequential``/``ModuleList`` containers only chain their children
   and are not such blocks; neither is a module that takes the model's input (the whole
   network, wrapped).
4. **One per grid, depth order.** For each grid the part that finished last wins (forward hooks
   of containers fire after their children, so the outermost module of the stage); among parts
   of one output a ``(N, C, *S)`` map beats a token or channels-last reading. The picks are
   returned in the order they finished, so the deepest layer comes last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from erf_monitor.core.buffers import preserved_training
from erf_monitor.targets.layers import (
    Selector,
    format_selector,
    module_table,
    unwrap_model,
)
from erf_monitor.targets.observe import hooked_forward
from erf_monitor.targets.outputs import output_parts
from erf_monitor.targets.tokens import TokenLayout, resolve_layout

__all__ = ["GLOBAL_POOLS", "GRID_MODULES", "AutoPick", "auto_layers", "pick_layers", "read_outputs"]

#: Outputs of these are ``(N, C, *S)`` by construction: their grids are the known grids.
GRID_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
)
GLOBAL_POOLS: tuple[type[nn.Module], ...] = (
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)

Grid = tuple[int, ...]


@dataclass(frozen=True)
class AutoPick:
    """What ``layers="auto"`` chose: layer specs in depth order and the layouts it inferred.

    Attributes:
        names: layer specs (with output selectors where a part of an output was picked).
        layouts: ``{name: TokenLayout(channels_last=True)}`` for channels-last picks; token
            sequences are left to the probe's own layout inference.
    """

    names: list[str]
    layouts: dict[str, TokenLayout] = field(default_factory=dict)
    #: The shape of each pick (batch size 1), as recorded: no second forward needs it.
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: Outputs left out because their grid is all ones (a stage too deep for a small input).
    ones: set[str] = field(default_factory=set)


@dataclass
class _Part:
    selector: Selector
    shape: tuple[int, ...]
    batch_ok: bool
    is_input: bool
    tid: int  # id() of the tensor (the tensors are kept alive while the pick runs)
    storage: int  # data pointer of the tensor's storage (views of one tensor share it)
    tokens: Grid | None = None  # resolved patch grid of a token sequence


@dataclass
class _Call:
    name: str
    module: nn.Module
    order: int
    calls: int = 1
    in_parts: list[_Part] = field(default_factory=list)
    out_parts: list[_Part] = field(default_factory=list)


def _describe_part(
    sel: Selector,
    t: torch.Tensor,
    n: int,
    x: torch.Tensor,
    name: str,
    net: nn.Module,
    spatial: Grid,
) -> _Part:
    nd = len(spatial)
    shape = tuple(t.shape)
    part = _Part(
        sel,
        shape,
        batch_ok=t.dim() >= 2 and shape[0] == n and t.is_floating_point(),
        is_input=t is x,
        tid=id(t),
        storage=t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t),
    )
    if part.batch_ok and t.dim() == 3 and nd >= 2:
        try:
            layout = resolve_layout(name, shape, None, spatial, net)
        except ValueError:  # not a token sequence with an unambiguous grid
            layout = None
        if layout is not None and not layout.channels_last:
            part.tokens = layout.grid
    return part


def _record(
    net: nn.Module,
    x: torch.Tensor,
    forward_fn: Callable[[nn.Module, torch.Tensor], Any] | None,
    stop_after: set[str] | None = None,
    table: dict[str, nn.Module] | None = None,
) -> list[_Call]:
    """Run the forward once and describe the first call of every module, in finish order
    (stopping once every module of ``stop_after`` has finished, when given)."""
    x = x.clone()  # a model may modify its input in place (a ReLU(inplace=True) first)
    spatial = tuple(x.shape[2:])
    n = x.shape[0]
    calls: dict[str, _Call] = {}
    alive: list[Any] = []  # keeps every recorded tensor alive, so that no id() is reused
    modules = module_table(net) if table is None else table

    def take(name: str, out: Any, args: Any) -> None:
        alive.append((args, out))
        call = _Call(name, modules[name], len(calls) + 1)
        for sel, t in output_parts(out):
            call.out_parts.append(_describe_part(sel, t, n, x, name, net, spatial))
        for sel, t in output_parts(tuple(args), max_depth=2):
            call.in_parts.append(_describe_part(sel, t, n, x, name, net, spatial))
        calls[name] = call

    located = {name: (module, ()) for name, module in modules.items()}
    with preserved_training(net), torch.no_grad():
        net.eval()
        counts = hooked_forward(
            net, forward_fn, x, located, take, with_args=True,
            stop_after=stop_after or (), require_all=False, copy_input=False,
        )  # fmt: skip
    for name, call in calls.items():
        call.calls = counts[name]
    alive.clear()
    return sorted(calls.values(), key=lambda c: c.order)


Reading = tuple[Grid, str] | None


def _near(grid: Grid, ref: Grid) -> bool:
    """``grid`` is ``ref``, or ``ref`` halved or doubled (rounding either way) on every dim."""
    if len(grid) != len(ref):
        return False
    if grid == ref:
        return True
    halved = all(a in (b // 2, -(-b // 2)) for a, b in zip(grid, ref))
    doubled = all(b in (a // 2, -(-a // 2)) for a, b in zip(grid, ref))
    return halved or doubled


class _Reader:
    """Reads module outputs as maps, in finish order (rule 1 of the module docstring)."""

    def __init__(self, x_spatial: Grid, nd: int) -> None:
        self.nd = nd
        self.current: Grid = x_spatial
        self.seen: set[Grid] = {x_spatial}
        self.by_tensor: dict[int, Reading] = {}
        #: ``(module name, shape, reading)`` of every output its module's kind decided.
        self.evidence: list[tuple[str, tuple[int, ...], Reading]] = []

    def plausible(self, grid: Grid) -> bool:
        return _near(grid, self.current)

    def input(self, part: _Part) -> Reading:
        """Reading of a module input: the model input, a tensor read before, or (made by a
        function, e.g. a normalisation in ``forward``) a map on a grid seen before."""
        if part.tid in self.by_tensor:
            return self.by_tensor[part.tid]
        if not part.batch_ok or part.tokens is not None or len(part.shape) != self.nd + 2:
            return None
        if part.is_input or tuple(part.shape[2:]) in self.seen:
            return tuple(part.shape[2:]), "first"
        return None

    def output(self, part: _Part, call: _Call) -> Reading:
        read = self._output(part, call)
        if read is not None or part.tid not in self.by_tensor:
            self.by_tensor[part.tid] = read
        if read is not None:
            self.current = read[0]
            self.seen.add(read[0])
        return read

    def _output(self, part: _Part, call: _Call) -> Reading:
        # A tensor an inner module could not read (an activation of a sum whose channels
        # equal its side, 24 x 24 x 24) may be read by the block that returns it.
        if self.by_tensor.get(part.tid) is not None:
            return self.by_tensor[part.tid]
        if not part.batch_ok:
            return None
        for p in call.in_parts:
            if p.tid == part.tid:  # its input passed through (Identity, an in-place ReLU)
                return self.input(p)
        nd = self.nd
        if part.tokens is not None:
            return part.tokens, "tokens"
        if len(part.shape) != nd + 2:
            return None
        first, last = tuple(part.shape[2:]), tuple(part.shape[1:-1])
        if isinstance(call.module, GRID_MODULES):
            self.evidence.append((call.name, part.shape, (first, "first")))
            return first, "first"
        if _norms_last_dim(call.module, part.shape) and self.plausible(last):
            self.evidence.append((call.name, part.shape, (last, "last")))
            return last, "last"  # a channel norm over the last dim: channels-last
        for p in call.in_parts:
            if p.shape == part.shape and (p.tid in self.by_tensor or p.is_input):
                return self.input(p)  # elementwise modules, residual blocks (as read before)
        inside = self._inside(call.name, part.shape)
        if inside is not None:
            return inside
        # One part of a dict/tuple output (an FPN level) may sit on any grid read before.
        seen = bool(part.selector)
        ok_first = self.plausible(first) or (seen and first in self.seen)
        ok_last = self.plausible(last) or (seen and last in self.seen)
        if ok_first and (not ok_last or first != last):
            return first, "first"
        if ok_last and not ok_first:
            return last, "last"
        return None

    def _inside(self, name: str, shape: tuple[int, ...]) -> Reading:
        """The reading of the last map of this shape made inside the module by a module whose
        kind decides (a convolution, a channel norm): a block's output keeps the layout of
        the map it adds to, activates or pools without changing its shape."""
        prefix = name + "."
        for inner, inner_shape, read in reversed(self.evidence):
            if inner.startswith(prefix) and inner_shape == shape:
                return read
        return None


def _norm_like(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return True
    cls = type(module).__name__
    return "LayerNorm" in cls or "RMSNorm" in cls


def _norms_last_dim(module: nn.Module, shape: tuple[int, ...]) -> bool:
    """A LayerNorm/RMSNorm over the last dim alone, whose size it has: a channel norm of a
    channels-last map (not a channels-first one such as ``LayerNorm2d`` or Hugging Face's
    ``data_format="channels_first"`` norms)."""
    normalized = getattr(module, "normalized_shape", None)
    if not _norm_like(module) or not isinstance(normalized, (tuple, list)) or len(normalized) != 1:
        return False
    first = "first" in str(getattr(module, "data_format", "")).lower()
    named_nd = type(module).__name__.lower().endswith(("1d", "2d", "3d"))
    return not first and not named_nd and int(normalized[0]) == shape[-1]


def _skipped(module: nn.Module) -> bool:
    """Global pools, and pass-through modules (the layer before them is the same map)."""
    cls = type(module).__name__
    if isinstance(module, (*GLOBAL_POOLS, nn.Identity, nn.modules.dropout._DropoutNd)):
        return True
    return any(k in cls for k in ("AdaptivePool", "GlobalPool", "DropPath", "StochasticDepth"))


_PLAIN_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_layer(module: nn.Module) -> bool:
    """At most one level of children (a conv, or a conv-norm-activation ``Sequential``), not
    counting the parameter-free leaves of a child (timm's ``BatchNormAct2d`` holds its
    activation and an ``Identity``: its ``ConvNormAct`` is still one layer)."""
    return all(
        not any(True for _ in g.children()) and not any(True for _ in g.parameters())
        for c in module.children()
        for g in c.children()
    )


def _read(
    model: nn.Module,
    x: torch.Tensor,
    forward_fn: Callable[[nn.Module, torch.Tensor], Any] | None,
    stop_after: set[str] | None = None,
    table: dict[str, nn.Module] | None = None,
) -> tuple[list[_Call], dict[str, list[Reading]], dict[str, list[Reading]]]:
    """Record one forward and read every module's inputs and outputs (rule 1)."""
    net = unwrap_model(model)
    nd = x.dim() - 2
    # Two samples: a tensor with batch size 2 depends on the input (a position-bias table
    # of batch 1 would pass for a map of a 1-sample probe).
    x = x[:2] if x.shape[0] >= 2 else torch.cat([x, x])
    calls = _record(net, x, forward_fn, stop_after, table)
    reader = _Reader(tuple(x.shape[2:]), nd)
    ins: dict[str, list[Reading]] = {}
    outs: dict[str, list[Reading]] = {}
    for c in calls:  # finish order: a module's inputs were made before it finished
        ins[c.name] = [reader.input(p) for p in c.in_parts]
        outs[c.name] = [reader.output(p, c) for p in c.out_parts]
    return calls, ins, outs


def read_outputs(
    model: nn.Module,
    x: torch.Tensor,
    forward_fn: Callable[[nn.Module, torch.Tensor], Any] | None,
    modules: set[str],
    table: dict[str, nn.Module] | None = None,
) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """How rule 1 reads the outputs of ``modules`` (and each part of one, by its selector):
    ``{name + selector: (shape at batch 1, "first" | "last" | "tokens" | None)}`` (``None``:
    no map, or a layout that cannot be told). One recorded forward, stopped once every one
    of ``modules`` has finished: named layers are read exactly as ``"auto"`` reads them."""
    calls, _ins, outs = _read(model, x, forward_fn, modules, table)
    out: dict[str, tuple[tuple[int, ...], str | None]] = {}
    for c in calls:
        if c.name not in modules:
            continue
        for part, read in zip(c.out_parts, outs[c.name]):
            if part.batch_ok:  # a floating-point map of the batch (else the caller says why)
                key = c.name + format_selector(part.selector)
                out[key] = ((1, *part.shape[1:]), None if read is None else read[1])
    return out


def pick_layers(
    model: nn.Module,
    x: torch.Tensor,
    forward_fn: Callable[[nn.Module, torch.Tensor], Any] | None = None,
    table: dict[str, nn.Module] | None = None,
) -> AutoPick:
    """Pick one layer per spatial stage of ``model`` on input ``x`` (see the module docstring).

    Runs one forward pass (no gradients, eval mode, every module's ``training`` flag restored).
    ``table``: the model's :func:`~erf_monitor.targets.layers.module_table`, when the caller
    built it already.

    Raises:
        ValueError: when no module output is a spatial map of the input.

    Examples:
        >>> net = nn.Sequential(
        ...     nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm([8, 16, 16]), nn.ReLU(),
        ...     nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        ... )
        >>> pick_layers(net, torch.randn(1, 3, 16, 16)).names
        ['2', '4']
    """
    calls, ins, outs = _read(model, x, forward_fn, table=table)
    by_name = {c.name: c for c in calls}

    def grids(reads: list[Reading]) -> set[Grid]:
        return {r[0] for r in reads if r is not None}

    # Grids of every module's outputs and of its descendants' (a block has 2, a network more).
    inside: dict[str, set[Grid]] = {}
    for c in calls:
        g = {grid for grid in grids(outs[c.name]) if any(d > 1 for d in grid)}  # not SE pools
        parts = c.name.split(".")
        for i in range(1, len(parts) + 1):
            inside.setdefault(".".join(parts[:i]), set()).update(g)

    def in_transition(call: _Call, grid: Grid) -> bool:
        layer = _is_layer(call.module)
        parts = call.name.split(".")
        for i in range(1, len(parts)):
            anc = by_name.get(".".join(parts[:i]))
            if anc is None or type(anc.module) in _PLAIN_CONTAINERS:
                continue
            if any(p.is_input for p in anc.in_parts):
                continue  # the whole network (wrapped, e.g. in a LightningModule)
            in_grids, out_grids = grids(ins[anc.name]), grids(outs[anc.name])
            if grid in in_grids and not out_grids:
                return True  # inside a head: maps in, no map out (pooling, concatenation)
            spread = {g for g in inside.get(anc.name, set()) | in_grids if any(d > 1 for d in g)}
            block = len(spread) <= 2  # a block works on two grids, a sub-network on more
            if layer and block and grid in in_grids and grid not in out_grids:
                return True  # the first layer of a block that changes the grid
        return False

    def in_map(call: _Call) -> bool:
        """Whether a module around ``call`` outputs a map with more than one unit."""
        parts = call.name.split(".")
        return any(
            any(d > 1 for g in grids(outs[anc]) for d in g)
            for anc in (".".join(parts[:i]) for i in range(1, len(parts)))
            if anc in outs
        )

    # A LayerNorm's output (and any view of it) has a constant channel sum by construction.
    normed = {p.storage for c in calls if _norm_like(c.module) for p in c.out_parts}
    best: dict[Grid, tuple[tuple[int, int, int], str, str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    ones: set[str] = set()
    for call in calls:
        if call.calls > 1 or _norm_like(call.module) or _skipped(call.module):
            continue
        for i, (part, read) in enumerate(zip(call.out_parts, outs[call.name])):
            if read is None or part.is_input or len(part.selector) > 1:
                continue  # (nested parts, e.g. an RPN head's per-level lists, are never picked)
            grid, layout = read
            if all(g == 1 for g in grid):
                if not in_map(call):  # not a squeeze-excitation inside a block, say
                    ones.add(call.name + format_selector(part.selector))
                continue
            if part.storage in normed or in_transition(call, grid):
                continue
            # Later calls win; within one output a (N, C, *S) reading beats the others.
            rank = (call.order, 1 if layout == "first" else 0, -i)
            if grid not in best or rank > best[grid][0]:
                spec = call.name + format_selector(part.selector)
                best[grid] = (rank, spec, layout)
                shapes[spec] = (1, *part.shape[1:])
    if not best:
        raise ValueError(
            "layers='auto' found no module output that is a spatial map of the input "
            "((N, C, *S), channels-last or a ViT token sequence); name the layers explicitly."
        )
    chosen = sorted(best.values(), key=lambda v: (v[0][0], -v[0][2]))
    names = [name for _, name, _ in chosen]
    layouts = {name: TokenLayout(channels_last=True) for _, name, lay in chosen if lay == "last"}
    return AutoPick(names, layouts, {n: shapes[n] for n in names}, ones)


def auto_layers(
    model: nn.Module,
    x: torch.Tensor,
    forward_fn: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> list[str]:
    """The layer specs of :func:`pick_layers` (depth order, deepest last)."""
    return pick_layers(model, x, forward_fn).names
