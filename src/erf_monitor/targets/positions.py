"""Seed positions: which output unit(s) of a layer the ERF is measured for.

A *position* names one output unit independently of the layer's output size, so that one
request works for every probed layer:

* ``"centre"`` (or ``"center"``): the mode's seed unit, ``S' // 2`` per dim (the default; see
  :func:`erf_monitor.core.modes.seed_index` for the one exception).
* a tuple with one entry per spatial dim, each entry either
    - an ``int`` output index ``i`` (negative counts from the end, as in Python:
      ``-1`` is the last unit), or
    - a ``float`` fraction ``f`` of the output plane in ``[0, 1]``: index
      ``min(floor(f * S'), S' - 1)``, so ``0.0`` is the first unit, ``0.5`` the centre unit
      ``S' // 2`` and ``1.0`` the last one.

  e.g. ``(0, -1)`` (top-right unit), ``(0.0, 0.5)`` (middle of the top edge), ``(3, 0.5)``.

A *set* of positions is measured in one probe:

* ``"corners"``: every unit at an end of every axis (4 in 2-D);
* ``"edges"``: the middle of every side, ``(0, 0.5)``, ``(-1, 0.5)``, ``(0.5, 0)``, ``(0.5, -1)``
  in 2-D (one end of one axis, the centre fraction on the others);
* a ``k x k`` grid, ``"grid:k"`` or ``("grid", k)``: per dim the units
  ``floor(i * (S' - 1) / (k - 1) + 1/2)`` for ``i = 0 .. k-1`` (``k >= 2``: the first and the
  last unit and evenly spaced ones between; for odd ``k`` the middle one is ``S' // 2``);
  ``k = 1`` is the centre;
* a list of single positions, e.g. ``[(0, 0), (0.25, 0.75), "centre"]``.

Every position has a *key*, a short stable name used in logged keys
(``erf/<layer>/<key>/<metric>``), file names and tables: ``centre``, ``corner_top_left``,
``edge_bottom``, ``grid5_y0_x4`` (row 0, column 4 of a 5 x 5 grid), ``y3_x-1`` (indices),
``y0pct_x50pct`` (fractions, in percent; a decimal point is written ``p``: ``12p5pct``).
Keys depend only on the request, never on the input size, so curves stay continuous.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from erf_monitor.core.modes import seed_index

__all__ = [
    "CENTRE",
    "Index",
    "Position",
    "PositionLike",
    "PositionRequest",
    "PositionSpec",
    "check_position",
    "parse_position_text",
    "request",
]

Index = tuple[int, ...]
#: One position: ``"centre"``, or one int index / float fraction per spatial dim.
PositionLike = Literal["centre", "center"] | tuple[int | float, ...]
#: What ``position=`` accepts: one position, a named set, a grid, or a list of positions.
PositionSpec = (
    PositionLike
    | Literal["corners", "edges"]
    | str  # "grid:k"
    | tuple[Literal["grid"], int]
    | Sequence[PositionLike]
)

_SETS = ("corners", "edges")
#: Names of the two ends of each axis, for keys (2-D: rows top/bottom, columns left/right).
_ENDS: dict[int, tuple[tuple[str, str], ...]] = {
    1: (("left", "right"),),
    2: (("top", "bottom"), ("left", "right")),
    3: (("front", "back"), ("top", "bottom"), ("left", "right")),
}
_MAX_GRID = 64


def _axis_names(nd: int) -> tuple[str, ...]:
    return ("z", "y", "x")[3 - nd :] if 1 <= nd <= 3 else tuple(f"d{i}" for i in range(nd))


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, numbers.Integral))


def _fraction_text(f: float) -> str:
    return f"{100 * f:.6g}".replace(".", "p") + "pct"


@dataclass(frozen=True)
class Position:
    """One requested seed unit, independent of the layer's output size.

    Attributes:
        key: the stable, readable name of the position (see the module docs).
        coords: ``None`` for the centre unit; else one entry per spatial dim: an ``int``
            index (negative from the end) or a ``float`` fraction of the output plane.
        cell: for grid positions, the cell ``(row, col, ...)`` of the ``k x k`` grid.
        k: the grid's size (``0`` when not a grid position).
    """

    key: str
    coords: tuple[int | float, ...] | None = None
    cell: Index | None = None
    k: int = 0

    @property
    def is_centre(self) -> bool:
        """Whether this is the centre unit (``"centre"``)."""
        return self.coords is None and self.cell is None

    def index(self, grid: Index, mode: str = "luo", tokens: bool = False, layer: str = "") -> Index:
        """The unit's index on an output grid ``S'`` (non-negative).

        Raises:
            ValueError: an index outside the grid, or a position with the wrong number of dims
                (the message names ``layer`` and its grid).
        """
        if self.is_centre:
            return seed_index(mode, grid, tokens)
        where = f"layer {layer!r}: " if layer else ""
        if not grid:
            raise ValueError(
                f"{where}its output has no spatial grid (one unit), so position "
                f"{self.key!r} has no meaning there; probe it with position='centre'."
            )
        if self.cell is not None:
            k = self.k
            return tuple(
                math.floor(i * (s - 1) / (k - 1) + 0.5) if k > 1 else s // 2
                for i, s in zip(self.cell, grid)
            )
        coords = self.coords or ()
        if len(coords) != len(grid):
            raise ValueError(
                f"{where}position {coords!r} has {len(coords)} entries but the output grid "
                f"{grid} has {len(grid)} spatial dims."
            )
        out = []
        for c, s in zip(coords, grid):
            if _is_int(c):
                i = int(c)
                if not -s <= i < s:
                    raise ValueError(
                        f"{where}output index {i} of position {self.key!r} lies outside its "
                        f"output grid {grid} (valid: {-s} .. {s - 1}); use a fraction in "
                        "[0, 1] to name the same place on every layer."
                    )
                out.append(i % s)
            else:
                out.append(min(math.floor(float(c) * s), s - 1))
        return tuple(out)


#: The default position.
CENTRE = Position("centre")


@dataclass(frozen=True)
class PositionRequest:
    """A parsed ``position=`` argument: the positions and how results are returned.

    Attributes:
        positions: the requested positions, in order (no duplicate keys).
        is_set: a named set, a grid or a list: every layer's result is then the centre
            unit's, with all positions in its :attr:`~erf_monitor.ERFResult.field`.
        grid: ``(k,) * nd`` for a grid request, else ``None``.
    """

    positions: tuple[Position, ...]
    is_set: bool = False
    grid: Index | None = None

    @property
    def probed(self) -> tuple[Position, ...]:
        """Every position measured: a set always includes the centre (its reference)."""
        if self.is_set and not any(p.is_centre for p in self.positions):
            return (CENTRE, *self.positions)
        return self.positions

    @property
    def primary(self) -> Position:
        """The position whose result ``res[layer]`` is: the single one, or the centre."""
        return CENTRE if self.is_set else self.positions[0]

    @property
    def is_default(self) -> bool:
        """Only the centre unit, as without any ``position``."""
        return not self.is_set and self.positions[0].is_centre

    def indices(
        self, grid: Index, mode: str = "luo", tokens: bool = False, layer: str = ""
    ) -> dict[str, Index]:
        """``{key: output index}`` of every probed position on the grid ``S'``."""
        return {p.key: p.index(grid, mode, tokens, layer) for p in self.probed}


def _single(spec: Any, nd: int | None) -> Position | None:
    """A single position, or ``None`` if ``spec`` is not one."""
    if isinstance(spec, str):
        if spec in ("centre", "center"):
            return CENTRE
        return None
    if isinstance(spec, (tuple, list)) and spec and all(_is_int(c) or _is_float(c) for c in spec):
        coords: list[int | float] = []
        for c in spec:
            if _is_float(c):
                f = float(c)
                if not (0.0 <= f <= 1.0):  # also NaN
                    raise ValueError(
                        f"position {tuple(spec)!r}: a float is a fraction of the output plane "
                        f"and must be in [0, 1], got {c!r} (an int is an output index)."
                    )
                coords.append(f)
            else:
                coords.append(int(c))
        if nd is not None and len(coords) != nd:
            raise ValueError(
                f"position {tuple(spec)!r} has {len(coords)} entries but the input has {nd} "
                "spatial dim(s): give one index or fraction per spatial dim."
            )
        names = _axis_names(len(coords))
        parts = [
            n + (_fraction_text(float(c)) if _is_float(c) else str(int(c)))
            for n, c in zip(names, coords)
        ]
        return Position("_".join(parts), tuple(coords))
    return None


def _grid_size(spec: Any) -> int | None:
    k: Any = None
    if isinstance(spec, str) and spec.startswith("grid:"):
        text = spec[5:]
        if not text.strip().isdigit():
            raise ValueError(f"position {spec!r}: write a grid as 'grid:k' with an int k >= 1.")
        k = int(text)
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and spec[0] == "grid":
        k = spec[1]
        if not _is_int(k):
            raise TypeError(f"position {tuple(spec)!r}: the grid size must be an int, got {k!r}")
    else:
        return None
    if not 1 <= int(k) <= _MAX_GRID:
        raise ValueError(f"position {spec!r}: the grid size k must be in 1 .. {_MAX_GRID}, got {k}")
    return int(k)


def _grid(k: int, nd: int) -> tuple[Position, ...]:
    import itertools

    names = _axis_names(nd)
    out = []
    for cell in itertools.product(range(k), repeat=nd):
        key = f"grid{k}_" + "_".join(f"{n}{c}" for n, c in zip(names, cell))
        out.append(Position(key, None, tuple(cell), k))
    return tuple(out)


def _named(name: str, nd: int) -> tuple[Position, ...]:
    import itertools

    ends = _ENDS.get(nd) or tuple((f"d{d}lo", f"d{d}hi") for d in range(nd))
    out: list[Position] = []
    if name == "corners":
        for choice in itertools.product((0, 1), repeat=nd):
            coords = tuple(0 if c == 0 else -1 for c in choice)
            key = "corner_" + "_".join(ends[d][c] for d, c in enumerate(choice))
            out.append(Position(key, coords))
    else:  # edges: one end of one axis, the centre fraction on the others
        for d in range(nd):
            for c in (0, 1):
                coords_l: list[int | float] = [0.5] * nd
                coords_l[d] = 0 if c == 0 else -1
                out.append(Position(f"edge_{ends[d][c]}", tuple(coords_l)))
    return tuple(out)


def request(spec: Any = "centre", nd: int | None = None) -> PositionRequest:
    """Parse a ``position=`` argument (see the module docs).

    Args:
        spec: the position(s).
        nd: the number of spatial dims; ``None`` checks only what does not depend on it
            (named sets and grids then hold no positions yet).

    Raises:
        ValueError: a malformed or out-of-range position, or duplicate positions.
        TypeError: a value of the wrong type.

    Examples:
        >>> [p.key for p in request("corners", 2).positions]
        ['corner_top_left', 'corner_top_right', 'corner_bottom_left', 'corner_bottom_right']
        >>> request((0, -1), 2).positions[0].index((7, 9))
        (0, 8)
        >>> request((0.0, 0.5), 2).positions[0].key
        'y0pct_x50pct'
        >>> [p.index((9, 9)) for p in request("grid:3", 2).positions][:4]
        [(0, 0), (0, 4), (0, 8), (4, 0)]
    """
    one = _single(spec, nd)
    if one is not None:
        return PositionRequest((one,))
    if isinstance(spec, str) and spec in _SETS:
        return PositionRequest(_named(spec, nd) if nd else (), is_set=True)
    k = _grid_size(spec)
    if k is not None:
        return PositionRequest(_grid(k, nd) if nd else (), is_set=True, grid=(k,) * (nd or 0))
    if isinstance(spec, (tuple, list)) and spec and not isinstance(spec, str):
        items = []
        for item in spec:
            p = _single(item, nd)
            if p is None:
                raise TypeError(
                    f"position list {spec!r}: every item must be 'centre' or a tuple of ints "
                    f"(indices) / floats (fractions), got {item!r}"
                )
            items.append(p)
        keys = [p.key for p in items]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"position list {spec!r} names {dupes} more than once")
        return PositionRequest(tuple(items), is_set=True)
    raise ValueError(
        f"position must be 'centre', an index tuple like (0, -1), a fraction tuple like "
        f"(0.0, 0.5), 'corners', 'edges', 'grid:k' / ('grid', k), or a list of positions; "
        f"got {spec!r}"
    )


def check_position(spec: Any) -> Any:
    """``spec`` if it is a valid ``position=`` value (dims are checked when probing).

    Raises:
        ValueError: a malformed position (the message says what is accepted).
        TypeError: a value of the wrong type.
    """
    request(spec, None)
    return spec


def parse_position_text(text: str) -> Any:
    """A ``position`` from command-line text.

    ``centre``, ``corners``, ``edges``, ``grid:5``; ``3,-1`` (indices), ``0.0,0.5``
    (fractions: a number with a decimal point); several single positions separated by
    ``;`` (``0,0;0.5,0.5``).

    Examples:
        >>> parse_position_text("3,-1"), parse_position_text("0.0,0.5")
        ((3, -1), (0.0, 0.5))
        >>> parse_position_text("0,0; centre")
        [(0, 0), 'centre']
    """
    text = text.strip()
    if ";" in text:
        return [parse_position_text(t) for t in text.split(";") if t.strip()]
    if "," not in text:
        if text.lstrip("-").isdigit() or "." in text:
            return (_number(text),)
        return text
    return tuple(_number(p) for p in text.split(","))


def _number(text: str) -> int | float:
    text = text.strip()
    try:
        return float(text) if "." in text or "e" in text.lower() else int(text)
    except ValueError:
        raise ValueError(f"not a number in a position: {text!r}") from None
