"""Plain files: a long-format CSV, PNG heatmaps, ``.npz`` maps and a text/alert log."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from urllib.parse import quote

import numpy as np

from erf_monitor.core.files import append_text, replaced
from erf_monitor.sinks._base import Sink

__all__ = ["MAPS_DIR", "FileSink", "arrays_relpath", "safe_filename", "save_npz"]

_MAX_NAME = 150
#: The folder of raw ``.npz`` maps, under every backend that keeps files.
MAPS_DIR = "erf_maps"


def safe_filename(name: str) -> str:
    """Escape a layer name or key so that it is one safe path component.

    Letters, digits and ``_ . - ~`` are kept (``layer1.0.conv1`` stays readable); everything
    else is percent-encoded like a URL (``/`` → ``%2F``), so the mapping is reversible with
    ``urllib.parse.unquote``. The empty name (the whole model) becomes ``_root``; ``.`` and
    ``..`` are encoded. Very long names are truncated and suffixed with a hash.

    Examples:
        >>> safe_filename("layer1.0.conv1")
        'layer1.0.conv1'
        >>> safe_filename("blocks/0 attn")
        'blocks%2F0%20attn'
        >>> safe_filename(""), safe_filename("..")
        ('_root', '%2E%2E')
    """
    if name == "":
        return "_root"
    out = quote(name, safe="")
    if set(out) == {"."}:
        out = out.replace(".", "%2E")
    if len(out) > _MAX_NAME:
        import hashlib

        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        out = f"{out[: _MAX_NAME - 11]}_{digest}"
    return out


def arrays_relpath(key: str, step: int) -> Path:
    """Relative path of the ``.npz`` file for raw arrays logged under ``key`` at ``step``.

    ``step_<N>.npz`` for the default key ``"erf"`` (also ``"maps"`` and ``""``), else
    ``<key>/step_<N>.npz`` with the key escaped by :func:`safe_filename`.

    Examples:
        >>> str(arrays_relpath("erf", 7)), str(arrays_relpath("erf/val", 7))
        ('step_7.npz', 'erf%2Fval/step_7.npz')
    """
    name = f"step_{int(step)}.npz"
    return Path(name) if key in ("erf", "maps", "") else Path(safe_filename(key)) / name


def save_npz(path: str | PathLike[str], arrays: Mapping[str, np.ndarray]) -> Path:
    """Write arrays as a compressed ``.npz`` that loads with ``np.load(allow_pickle=False)``.

    The file is exactly what ``np.savez_compressed(path, **arrays)`` writes (entry
    ``<name>.npy`` per array), but built entry by entry so that any name works (even
    ``"file"``, which ``savez`` would take as its own argument); object arrays are refused.
    It is written to a temporary name and renamed, so readers never see half a file, and a
    failed write leaves no file behind (see :func:`~erf_monitor.core.files.replaced`).

    Args:
        path: destination (parent directories are created).
        arrays: ``{name: array}``; names are the keys of the loaded ``NpzFile``.

    Returns:
        The path written.

    Raises:
        TypeError: for object arrays (they would need pickle).
    """
    import zipfile

    path = Path(path)
    with (
        replaced(path) as tmp,
        zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf,
    ):
        for name, value in arrays.items():
            a = np.asarray(value)
            if a.dtype.hasobject:
                raise TypeError(f"save_npz: {name!r} is an object array; only plain arrays")
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, a, allow_pickle=False)
    return path


class FileSink(Sink):
    """Write everything to a directory; no logging backend needed.

    Layout under ``directory``:

    * ``metrics.csv`` — long format, columns ``step,key,value``, appended (header written
      once, when the file is created).
    * ``heatmaps/<layer>/step_<N>.png`` — heatmap images logged as ``<prefix>/<layer>/heatmap``
      (``<layer>`` escaped with :func:`safe_filename`); other image keys go to
      ``images/<key>/step_<N>.png``.
    * ``erf_maps/step_<N>.npz`` — raw maps logged under the ``"erf"`` key (one array per
      layer, keyed by layer name; plain arrays, load with ``np.load(path,
      allow_pickle=False)``); other keys go to ``erf_maps/<key>/step_<N>.npz``. The folder
      has this name under every backend that keeps files (TensorBoard, W&B, MLflow).
    * ``events.log`` — text records, one line each: ``step<TAB>key<TAB>text``.
    * ``alerts.jsonl`` — one JSON object per alert: ``step``, ``title``, ``text``, ``time``.

    Files are opened per call and closed right away, so nothing is lost if training crashes.
    Every file is whole or absent, also when the disk fills up: rows and lines are appended
    whole (a torn last row is cut off before the next append), images and arrays are written
    to a temporary file and renamed (see :mod:`erf_monitor.core.files`).

    Args:
        directory: output directory (created if missing).

    Examples:
        >>> import tempfile
        >>> sink = FileSink(tempfile.mkdtemp())
        >>> sink.log_scalars({"erf/layer1/coverage": 0.25}, step=10)
        >>> (sink.directory / "metrics.csv").read_text().splitlines()
        ['step,key,value', '10,erf/layer1/coverage,0.25']
    """

    def __init__(self, directory: str | PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"FileSink({str(self.directory)!r})"

    @property
    def metrics_path(self) -> Path:
        """The long-format CSV file."""
        return self.directory / "metrics.csv"

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Append one ``step,key,value`` row per scalar to ``metrics.csv``."""
        rows = io.StringIO()
        writer = csv.writer(rows)
        for key, value in scalars.items():
            writer.writerow([int(step), key, repr(float(value))])
        append_text(self.metrics_path, rows.getvalue(), header="step,key,value\r\n")

    def image_path(self, key: str, step: int) -> Path:
        """Where :meth:`log_image` writes ``key`` at ``step``."""
        parts = key.split("/")
        if len(parts) >= 3 and parts[-1] == "heatmap":
            folder = self.directory / "heatmaps" / safe_filename("/".join(parts[1:-1]))
        else:
            folder = self.directory / "images" / safe_filename(key)
        return folder / f"step_{int(step)}.png"

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """Save the image as PNG (see the class docstring for the path)."""
        from erf_monitor.viz.render import save_png

        with replaced(self.image_path(key, step)) as tmp:
            save_png(image, tmp)

    def arrays_path(self, key: str, step: int) -> Path:
        """Where :meth:`log_arrays` writes: ``erf_maps/`` + :func:`arrays_relpath`."""
        return self.directory / MAPS_DIR / arrays_relpath(key, step)

    def log_arrays(self, key: str, arrays: Mapping[str, np.ndarray], step: int) -> None:
        """Save the arrays with :func:`save_npz` (entry names = array names, e.g. layers)."""
        save_npz(self.arrays_path(key, step), arrays)

    def log_text(self, key: str, text: str, step: int) -> None:
        """Append ``step<TAB>key<TAB>text`` to ``events.log`` (newlines escaped)."""
        line = f"{int(step)}\t{key}\t{text}".replace("\r", "\\r").replace("\n", "\\n")
        append_text(self.directory / "events.log", line + "\n")

    def alert(self, title: str, text: str, step: int) -> None:
        """Append the alert to ``alerts.jsonl`` and to ``events.log``."""
        record = {"step": int(step), "title": title, "text": text, "time": time.time()}
        append_text(self.directory / "alerts.jsonl", json.dumps(record) + "\n")
        self.log_text(f"alerts/{title}", text, step)
