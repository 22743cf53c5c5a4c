"""The growth chart: every layer's coverage over the steps in one image, redrawn at each probe.

One matplotlib figure is kept per chart and only its lines' data change from one probe to the
next (a new figure, its ticks and its text metrics per probe cost about twice as much); the
constrained layout runs again only when the step axis' labels reach out of the frame by another
amount (a longer step number at the right end): the rest around the axes never changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.lines import Line2D

__all__ = ["GROWTH_TAG", "GrowthChart"]

#: Tag of the growth chart: sorts before every metric card of the group.
GROWTH_TAG = "0_growth"


class GrowthChart:
    """Every layer's coverage over the steps in one chart, ``(H, W, 3)`` uint8 (see
    :meth:`image`), kept from one probe to the next."""

    def __init__(self) -> None:
        self._fig: Any = None
        self._canvas: Any = None
        self._lines: dict[str, Line2D] = {}
        self._shape: tuple[Any, ...] | None = None  # layers and thresholds drawn
        self._laid_out: tuple[int, ...] | None = None  # label overhangs at the last layout

    def image(
        self, series: Mapping[str, Mapping[int, float]], bounds: Mapping[str, float]
    ) -> np.ndarray:
        """The chart of ``series`` (``{layer: {step: coverage}}``): one colour and a legend
        entry per layer, each checked layer's ``min_coverage`` (``bounds``) dashed in its
        colour. Drawn from the values as logged, so no smoothing bends a jump and step 0
        stays on it."""
        shape = (tuple(series), tuple((k, bounds[k]) for k in series if k in bounds))
        if shape != self._shape:  # new layers or thresholds: a new figure
            self._build(series, bounds)
            self._shape = shape
        else:
            for layer, points in series.items():
                steps = sorted(points)
                self._lines[layer].set_data(steps, [points[s] for s in steps])
            ax = self._fig.axes[0]
            ax.relim()
            ax.autoscale_view()
        if self._overhangs() != self._laid_out:
            from matplotlib.layout_engine import ConstrainedLayoutEngine

            ConstrainedLayoutEngine().execute(self._fig)
            self._laid_out = self._overhangs()
        self._canvas.draw()
        return np.array(self._canvas.buffer_rgba())[..., :3].copy()

    def _build(
        self, series: Mapping[str, Mapping[int, float]], bounds: Mapping[str, float]
    ) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import PercentFormatter

        self._fig = Figure(figsize=(6.4, 3.6), dpi=100)  # laid out in image(), when needed
        self._canvas = FigureCanvasAgg(self._fig)
        self._laid_out = None
        ax = self._fig.add_subplot()
        self._lines = {}
        for i, (layer, points) in enumerate(series.items()):
            steps = sorted(points)
            colour = f"C{i % 10}"
            (self._lines[layer],) = ax.plot(
                steps, [points[s] for s in steps], "o-", ms=3, color=colour, label=layer
            )
            if layer in bounds:
                ax.axhline(
                    bounds[layer], color=colour, ls="--", lw=1, label=f"{layer}: min_coverage"
                )
        ax.set_ylim(0, 1)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("step")
        ax.set_ylabel("coverage")
        ax.set_title("ERF coverage per layer (as logged, unsmoothed)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")

    def _overhangs(self) -> tuple[int, ...]:
        """How far the step axis' tick labels and offset reach out of the frame to the left,
        right and bottom (whole pixels; the rest around the axes never changes): what the
        constrained layout makes room for."""
        renderer = self._canvas.get_renderer()
        ax = self._fig.axes[0]
        frame = ax.get_window_extent(renderer)
        box = ax.xaxis.get_tightbbox(renderer, for_layout_only=True)
        if box is None:
            return (0, 0, 0)
        return (
            max(0, round(frame.x0 - box.x0)),
            max(0, round(box.x1 - frame.x1)),
            max(0, round(frame.y0 - box.y0)),
        )
