"""What the pictures read from a result: the attributes of :class:`~erf_monitor.ERFResult`
and :class:`~erf_monitor.ERFField` that rendering uses, as protocols.

Rendering sits below the result types in the pipeline (the results draw themselves through
it), so it names what it needs instead of importing them.
"""

from __future__ import annotations

from collections.abc import ItemsView, ValuesView
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from erf_monitor.trf.types import TRF

__all__ = ["FieldLike", "MapResult"]


class MapResult(Protocol):
    """One layer's ERF at one seed unit, as rendering sees it."""

    @property
    def name(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def heatmap(self) -> torch.Tensor: ...
    @property
    def trf(self) -> TRF | None: ...
    @property
    def centre_pixel(self) -> tuple[int, ...]: ...
    @property
    def wrapped(self) -> tuple[bool, ...]: ...
    @property
    def output_index(self) -> tuple[int, ...]: ...
    @property
    def output_shape(self) -> tuple[int, ...]: ...
    @property
    def erf_size(self) -> int: ...
    @property
    def coverage(self) -> float: ...
    @property
    def ratio(self) -> float: ...
    @property
    def visible_size(self) -> float: ...
    @property
    def theoretical_centre(self) -> tuple[float, ...]: ...
    @property
    def centroid_offset(self) -> tuple[float, ...]: ...


class FieldLike(Protocol):
    """One layer's results at several seed units, as rendering sees it."""

    @property
    def centre(self) -> MapResult: ...
    @property
    def border_ratio(self) -> float: ...
    def values(self) -> ValuesView[MapResult]: ...
    def items(self) -> ItemsView[str, MapResult]: ...
