"""The first batch of a dataloader, read without disturbing the dataloader or any RNG.

Iterating a training dataloader to look at its first batch has side effects that change the
training: a ``RandomSampler`` draws its seed from the global RNG or from its own
``torch.Generator``, worker processes start, Accelerate's ``DataLoaderShard`` synchronises RNG
states across processes (a collective) and counts iterations. So the batch is rebuilt from the
loader's parts instead: the first index batch of its batch sampler (after the one draw a
real pass makes first, for its workers' base seed), the dataset's items, its ``collate_fn``,
with every RNG involved (global torch/NumPy/Python, and every ``torch.Generator`` of the
sampler chain) restored afterwards.
"""

from __future__ import annotations

from typing import Any

import torch

from erf_monitor.core.rng import preserved_rng

__all__ = ["peek_first_batch"]

_CHAIN = ("sampler", "batch_sampler", "generator")


def _base_loader(loader: Any) -> Any:
    # Accelerate's DataLoaderShard / DataLoaderDispatcher wrap a torch DataLoader.
    for _ in range(4):
        inner = getattr(loader, "base_dataloader", None)
        if inner is None or inner is loader:
            break
        loader = inner
    return loader


def _generators(obj: Any, depth: int = 0, seen: set[int] | None = None) -> list[torch.Generator]:
    seen = set() if seen is None else seen
    if obj is None or id(obj) in seen or depth > 4:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Generator):
        return [obj]
    found: list[torch.Generator] = []
    for name in _CHAIN:
        found += _generators(getattr(obj, name, None), depth + 1, seen)
    return found


def peek_first_batch(loader: Any) -> Any:
    """The batch that a fresh pass over ``loader`` yields first, leaving ``loader`` untouched.

    Map-style datasets: ``collate_fn(dataset[i] for i in first index batch)`` (through
    ``__getitems__`` when the dataset has it, as torch's fetcher does). Iterable datasets: the
    first batch of a new single-process ``DataLoader`` over the same dataset.

    Raises:
        ValueError: if ``loader`` is not a dataloader (no ``dataset``) or is empty.
    """
    base = _base_loader(loader)
    dataset = getattr(base, "dataset", None)
    if dataset is None:
        raise ValueError(f"the training dataloader {type(loader).__name__} has no dataset")
    generators = _generators(base)
    states = [g.get_state() for g in generators]
    try:
        with preserved_rng():
            batch_sampler = getattr(base, "batch_sampler", None)
            if isinstance(dataset, torch.utils.data.IterableDataset) or batch_sampler is None:
                fresh = torch.utils.data.DataLoader(
                    dataset, batch_size=base.batch_size, collate_fn=base.collate_fn
                )
                return next(iter(fresh))
            # A DataLoader's iterator draws its workers' base seed (from the loader's
            # generator or the global RNG) before its sampler runs: draw it too, so that the
            # sampler sees the RNG state it sees in training and yields the same indices.
            torch.empty((), dtype=torch.int64).random_(generator=getattr(base, "generator", None))
            indices = list(next(iter(batch_sampler)))
            fetch = getattr(dataset, "__getitems__", None)
            items = fetch(indices) if fetch else [dataset[i] for i in indices]
            return base.collate_fn(items)
    except StopIteration:
        raise ValueError("the training dataloader is empty") from None
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)
