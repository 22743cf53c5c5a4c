"""TensorBoard: an event file of the monitor's own, next to the user's writer, never in it.

Why not ``writer.add_image(...)`` on the user's ``SummaryWriter``? Its records are written by
a background thread that keeps the first ``OSError`` it meets (disk full, file size limit, a
directory turned read-only) and raises it again at every later call, including the
``flush()``/``close()`` that Lightning's ``TensorBoardLogger`` makes at the end of ``fit()``.
The monitor's heatmaps are by far the largest records in a run, so they are the ones that hit
a full disk first, and one failed heatmap would make the user's ``fit()`` raise where the same
run without the monitor ends normally. So the monitor writes its own event file, synchronously
(each call appends its records and closes the file, so an error surfaces in that call, is
reported once, and leaves nothing behind), in a sub-directory ``erf/`` of the writer's log
directory: TensorBoard reads one event file per directory at a time, so a second live file
next to the user's would stall the user's curves; in ``erf/`` it is a run of its own
(``version_0/erf`` next to ``version_0``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import time
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from erf_monitor.core.imports import require
from erf_monitor.sinks._base import Sink
from erf_monitor.sinks._growth import GROWTH_TAG, GrowthChart

__all__ = ["TB_SUBDIR", "TensorBoardSink", "key_from_tag", "tb_tag"]

#: Sub-directory of a ``SummaryWriter``'s log directory that the monitor's events go to.
TB_SUBDIR = "erf"
_COUNTER = itertools.count()

#: TensorBoard's Time Series view sorts a group's cards by tag: the growth metrics are
#: numbered so that every layer's coverage comes first, then ERF size, then ERF/TRF.
RANKED: dict[str, str] = {
    "coverage": "1_coverage",
    "erf_size": "2_erf_size",
    "erf_trf_ratio": "3_erf_trf_ratio",
}
_UNRANKED = {v: k for k, v in RANKED.items()}
#: Names of the last key part that are not metrics of ``ERFResult.scalars()``.
_OTHER_LEAVES = ("heatmap", "field", "min_coverage")
#: A layer named by Sequential indices only (``"1"``, ``"1.0"``): shown as ``layer_1``.
_INDEX = re.compile(r"\d+(\.\d+)*")
_SHOWN_INDEX = re.compile(r"layer_(\d+(\.\d+)*)")


def _is_leaf(name: str) -> bool:
    from erf_monitor.sinks._metrics import check_metrics

    if name in _OTHER_LEAVES or name in _UNRANKED:
        return True
    try:
        check_metrics([name])
    except ValueError:
        return False
    return "*" not in name and "?" not in name


def tb_tag(key: str) -> str:
    """The TensorBoard tag of a logged key: ``<prefix>/<layer>[/<position>]/<metric>`` becomes
    ``<prefix>/<metric>/<layer>[/<position>]``, with ``1_coverage``, ``2_erf_size`` and
    ``3_erf_trf_ratio`` numbered to sort first and Sequential indices shown as ``layer_<i>``;
    other keys (``erf/probe_time_s``, ``erf/mode``, ``alerts/...``) are kept.

    Examples:
        >>> tb_tag("erf/layer4/coverage"), tb_tag("erf/1/erf_size")
        ('erf/1_coverage/layer4', 'erf/2_erf_size/layer_1')
        >>> tb_tag("erf/layer4/corner_top_left/sigma_x"), tb_tag("erf/probe_time_s")
        ('erf/sigma_x/layer4/corner_top_left', 'erf/probe_time_s')
    """
    parts = key.split("/")
    if len(parts) < 3 or parts[0] == "alerts" or not _is_leaf(parts[-1]):
        return key
    prefix, layer, rest, leaf = parts[0], parts[1], parts[2:-1], parts[-1]
    shown = f"layer_{layer}" if _INDEX.fullmatch(layer) else layer
    return "/".join([prefix, RANKED.get(leaf, leaf), shown, *rest])


def key_from_tag(tag: str) -> str:
    """The logged key of a TensorBoard tag (the inverse of :func:`tb_tag`); a tag written
    before tags were reordered (``erf/<layer>/<metric>``) is returned as it is.

    Examples:
        >>> key_from_tag("erf/1_coverage/layer_1"), key_from_tag("erf/layer4/coverage")
        ('erf/1/coverage', 'erf/layer4/coverage')
    """
    parts = tag.split("/")
    if len(parts) < 3 or parts[0] == "alerts" or _is_leaf(parts[-1]) or not _is_leaf(parts[1]):
        return tag
    prefix, leaf, layer, rest = parts[0], parts[1], parts[2], parts[3:]
    index = _SHOWN_INDEX.fullmatch(layer)
    return "/".join([prefix, index.group(1) if index else layer, *rest, _UNRANKED.get(leaf, leaf)])


#: TensorBoard's Custom Scalars tab: one section per group, one card per layer with these
#: metrics (regular expressions over the tag's metric part) drawn together.
LAYOUT_GROUPS: tuple[tuple[str, str], ...] = (
    ("coverage, ERF/TRF ratio and min_coverage", r"1_coverage|3_erf_trf_ratio|min_coverage"),
    ("ERF size, sigma and centroid offset (px)", r"2_erf_size|sigma_\w|centroid_offset_\w"),
)


def custom_scalars_layout(heads: list[str]) -> dict[str, dict[str, list[Any]]]:
    """The Custom Scalars layout for the layers ``heads`` (``"erf/layer4"``...): for each
    group of :data:`LAYOUT_GROUPS` a section ``"<prefix>: <group>"`` with one multiline card
    per layer (the ``layout`` argument of ``SummaryWriter.add_custom_scalars``)."""
    layout: dict[str, dict[str, list[Any]]] = {}
    for title, metrics in LAYOUT_GROUPS:
        for head in heads:
            prefix = head.partition("/")[0]
            shown = tb_tag(f"{head}/coverage").split("/", 2)[2]
            section = layout.setdefault(f"{prefix}: {title}", {})
            section[shown] = [
                "Multiline",
                [f"^{re.escape(prefix)}/({metrics})/{re.escape(shown)}$"],
            ]
    return layout


class _EventFile:
    """One TensorBoard event file, appended to synchronously (opened and closed per call)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path: Path | None = None

    def write(self, summaries: list[Any], step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter

        events = [Event(wall_time=time.time(), step=int(step), summary=s) for s in summaries]
        new = self.path is None
        if self.path is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = (
                f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_COUNTER)}.erf-monitor"
            )
            path = self.directory / name
            events.insert(0, Event(wall_time=time.time(), file_version="brain.Event:2"))
        else:
            path = self.path
        size = 0 if new else path.stat().st_size
        try:
            with path.open("xb" if new else "ab") as f:
                writer = RecordWriter(f)
                for event in events:
                    writer.write(event.SerializeToString())
        except BaseException:
            # Leave no partial record behind: TensorBoard stops reading a file at a bad one.
            with contextlib.suppress(OSError):
                if new:
                    path.unlink()
                else:
                    os.truncate(path, size)
            raise
        self.path = path


class TensorBoardSink(Sink):
    """Log to TensorBoard.

    The sink writes an event file of its own (see the module docstring for why):

    * given a ``SummaryWriter`` (or a Lightning ``TensorBoardLogger``'s, via
      :func:`~erf_monitor.sinks.sink_for_logger`): in ``<writer log dir>/erf/``, a run of its
      own in TensorBoard (``tensorboard --logdir`` the parent shows both). The writer itself
      is never written to, flushed or closed, so a full disk can only cost the monitor's data;
    * given a directory: in that directory.

    Scalars are ``simple_value`` summaries, heatmaps PNG image summaries, texts and alerts
    text-plugin summaries (tags ``<key>/text_summary``), exactly what ``add_scalar``,
    ``add_image`` and ``add_text`` would write. Tags put the metric first so that TensorBoard's
    Time Series view (cards sorted by tag) opens on growth: ``erf/0_growth`` (a chart of every
    layer's coverage as logged, one colour and legend entry each, the thresholds dashed; no
    smoothing bends it), then every layer's ``1_coverage``, ``2_erf_size`` and
    ``3_erf_trf_ratio`` (see :func:`tb_tag`). The Custom Scalars tab gets a layout (see
    :func:`custom_scalars_layout`): per layer one card with coverage, ERF/TRF ratio and
    ``min_coverage``, one with ERF size, sigma and centroid offset. Raw maps are saved as
    ``<run dir>/erf_maps/step_<N>.npz`` when ``save_arrays`` is true (TensorBoard ignores them).
    A writer-like object without a log directory is written to with its ``add_*`` methods.

    TensorBoard shows only 10 images per tag unless started with
    ``tensorboard --logdir DIR --samples_per_plugin images=1000`` (any number at least the
    number of probes; ``images=0`` shows no image at all in TensorBoard 2.21, not all).

    Args:
        writer_or_logdir: a ``SummaryWriter`` (only its log directory is used) or a directory.
        save_arrays: keep raw maps as ``.npz`` files next to the event file.
        subdir: sub-directory of a writer's log directory for the monitor's run.

    Raises:
        ModuleNotFoundError: if ``tensorboard`` is not installed.
    """

    def __init__(
        self, writer_or_logdir: Any, *, save_arrays: bool = True, subdir: str = TB_SUBDIR
    ) -> None:
        self.writer: Any = None
        if isinstance(writer_or_logdir, (str, PathLike)):
            run_dir: Path | None = Path(writer_or_logdir)
        elif hasattr(writer_or_logdir, "add_scalar") and hasattr(writer_or_logdir, "add_image"):
            getter = getattr(writer_or_logdir, "get_logdir", None)
            logdir = getter() if callable(getter) else getattr(writer_or_logdir, "log_dir", None)
            run_dir = Path(logdir) / subdir if isinstance(logdir, (str, PathLike)) else None
            if run_dir is None:
                self.writer = writer_or_logdir
        else:
            raise TypeError(
                "TensorBoardSink needs a SummaryWriter or a log directory, got "
                f"{type(writer_or_logdir).__name__}"
            )
        if run_dir is not None:
            require("tensorboard", "tensorboard", "TensorBoardSink")
        self.run_dir = run_dir
        self._file = _EventFile(run_dir) if run_dir is not None else None
        self.save_arrays = save_arrays
        self._heads: list[str] = []  # "<prefix>/<layer>" of the layers in the layout
        # {prefix: {layer: {step: coverage}}} and {prefix: {layer: min_coverage}}: the chart
        self._growth: dict[str, dict[str, dict[int, float]]] = {}
        self._bounds: dict[str, dict[str, float]] = {}
        self._charts: dict[str, GrowthChart] = {}  # one kept figure per prefix

    def __repr__(self) -> str:
        return f"TensorBoardSink({self.run_dir!s})"

    @property
    def log_dir(self) -> Path | None:
        """The directory of the monitor's event file (``None`` for a writer without one)."""
        return self.run_dir

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """One scalar summary per key; the Custom Scalars layout when new layers appear."""
        heads = [k.removesuffix("/coverage") for k in scalars if k.endswith("/coverage")]
        new = [h for h in heads if h not in self._heads]
        self._heads.extend(new)
        charts = self._growth_charts(scalars, step)
        if self._file is None:
            for key, value in scalars.items():
                self.writer.add_scalar(tb_tag(key), float(value), global_step=int(step))
            if new:
                self.writer.add_custom_scalars(custom_scalars_layout(self._heads))
            for tag, image in charts.items():
                self.writer.add_image(tag, image, global_step=int(step), dataformats="HWC")
            return
        from torch.utils.tensorboard.summary import custom_scalars, scalar
        from torch.utils.tensorboard.summary import image as image_summary

        summaries = [scalar(tb_tag(k), float(v)) for k, v in scalars.items()]
        if new:  # TensorBoard uses a run's latest layout
            summaries.append(custom_scalars(custom_scalars_layout(self._heads)))
        summaries += [image_summary(t, im, dataformats="HWC") for t, im in charts.items()]
        self._file.write(summaries, step)

    def _growth_charts(self, scalars: Mapping[str, float], step: int) -> dict[str, np.ndarray]:
        """``{"<prefix>/0_growth": image}`` for every prefix whose coverage this call logs."""
        changed = set()
        for key, value in scalars.items():
            parts = key.split("/")
            if len(parts) != 3:  # centre units only
                continue
            shown = tb_tag(key).split("/")[2]  # the layer as its cards name it
            if parts[2] == "coverage":
                self._growth.setdefault(parts[0], {}).setdefault(shown, {})[step] = float(value)
                changed.add(parts[0])
            elif parts[2] == "min_coverage":
                self._bounds.setdefault(parts[0], {})[shown] = float(value)
        return {
            f"{prefix}/{GROWTH_TAG}": self._charts.setdefault(prefix, GrowthChart()).image(
                self._growth[prefix], self._bounds.get(prefix, {})
            )
            for prefix in sorted(changed)
        }

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """A PNG image summary (``(H, W, 3)`` uint8 RGB)."""
        key = tb_tag(key)
        if self._file is None:
            self.writer.add_image(key, image, global_step=int(step), dataformats="HWC")
            return
        from torch.utils.tensorboard.summary import image as image_summary

        self._file.write([image_summary(key, image, dataformats="HWC")], step)

    def log_text(self, key: str, text: str, step: int) -> None:
        """A text summary (TensorBoard's TEXT tab)."""
        if self._file is None:
            self.writer.add_text(key, text, global_step=int(step))
            return
        from torch.utils.tensorboard.summary import text as text_summary

        self._file.write([text_summary(key, text)], step)

    def log_arrays(self, key: str, arrays: Mapping[str, np.ndarray], step: int) -> None:
        """Save ``<run dir>/erf_maps/step_<N>.npz`` (format: :func:`save_npz`)."""
        if not self.save_arrays or self.run_dir is None:
            return
        from erf_monitor.sinks._file import MAPS_DIR, arrays_relpath, save_npz

        save_npz(self.run_dir / MAPS_DIR / arrays_relpath(key, step), arrays)

    def flush(self) -> None:
        """Nothing to do: every call is on disk when it returns (a writer is flushed)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Drops the growth charts' figures (a later probe draws new ones)."""
        self._charts.clear()
