"""Saving and restoring every random stream a probe could advance.

A probe runs the user's model (which may draw from torch's, Python's or NumPy's global
generators: dropout in train mode, stochastic depth drawn with ``random.random()``, noise from
``np.random``), copies it for the numeric TRF analysis, and reads data from the user's
datasets. Training with the monitor must stay bit-for-bit identical, so every stream is put
back afterwards: torch's CPU generator, every initialised CUDA device's generator, Python's
``random``, NumPy's global ``RandomState``, and any private generator objects passed in
(a sampler's or a dataset's own ``torch.Generator``, ``np.random.Generator``,
``np.random.RandomState`` or ``random.Random``).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["find_generators", "preserved_rng"]

_GENERATOR_TYPES = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)


def _get_state(gen: Any) -> Any:
    if isinstance(gen, torch.Generator):
        return gen.get_state()
    if isinstance(gen, np.random.Generator):
        return gen.bit_generator.state
    if isinstance(gen, np.random.RandomState):
        return gen.get_state()
    return gen.getstate()


def _set_state(gen: Any, state: Any) -> None:
    if isinstance(gen, torch.Generator):
        gen.set_state(state)
    elif isinstance(gen, np.random.Generator):
        gen.bit_generator.state = state
    elif isinstance(gen, np.random.RandomState):
        gen.set_state(state)
    else:
        gen.setstate(state)


def find_generators(*objects: Any, depth: int = 3) -> list[Any]:
    """Private generator objects held by ``objects`` (their attributes, ``depth`` levels deep).

    Looks through instance attributes, lists, tuples and dicts (datasets wrapping datasets,
    samplers holding a ``generator``); each generator is returned once.

    Examples:
        >>> class Data:
        ...     def __init__(self):
        ...         self.rng = np.random.default_rng(0)
        >>> [type(g).__name__ for g in find_generators(Data())]
        ['Generator']
    """
    found: dict[int, Any] = {}
    seen: set[int] = set()

    def visit(obj: Any, level: int) -> None:
        if obj is None or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, _GENERATOR_TYPES):
            found.setdefault(id(obj), obj)
            return
        if level >= depth or isinstance(obj, (str, bytes, int, float, bool, torch.Tensor)):
            return
        if isinstance(obj, np.ndarray):
            return
        if isinstance(obj, dict):
            children: Iterable[Any] = list(obj.values())
        elif isinstance(obj, (list, tuple)):
            children = obj
        else:
            children = list(getattr(obj, "__dict__", {}).values())
        for child in children:
            visit(child, level + 1)

    for obj in objects:
        visit(obj, 0)
    return list(found.values())


@contextlib.contextmanager
def preserved_rng(
    device: torch.device | None = None, generators: Iterable[Any] = ()
) -> Iterator[None]:
    """Restore every global random stream (and ``generators``) on exit, also on error.

    Args:
        device: a CUDA device to include even if CUDA is not initialised yet.
        generators: private generator objects to restore too (see :func:`find_generators`).

    Examples:
        >>> state = random.getstate(), torch.get_rng_state()
        >>> with preserved_rng():
        ...     _ = random.random(), np.random.rand(), torch.rand(1)
        >>> random.getstate() == state[0], torch.equal(torch.get_rng_state(), state[1])
        (True, True)
    """
    privates = [(g, _get_state(g)) for g in generators]
    py_state = random.getstate()
    np_state = np.random.get_state()
    devices: list[int] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = list(range(torch.cuda.device_count()))
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        devices = sorted({*devices, index})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        for gen, state in privates:
            _set_state(gen, state)
