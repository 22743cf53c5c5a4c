"""The first items of a user's data loader, read without touching the loader.

``iter(loader)`` is not harmless: it draws the sampler's seed (from the global generator or
the sampler's own), draws the workers' base seed, starts worker processes, and for a loader
with ``persistent_workers=True`` *becomes* (or resets) the iterator that the training loop
reuses. Any of these changes which batches training sees and so the final weights. So the
probe batch is read from the loader's *dataset*: its first items in dataset order (no
sampler, no workers), collated with the loader's own ``collate_fn``, in this process, with
every global random stream and every generator the dataset holds restored afterwards.
"""

from __future__ import annotations

import itertools
from typing import Any

from erf_monitor.core.rng import find_generators, preserved_rng

__all__ = ["first_items"]


def first_items(loader: Any, n: int) -> Any:
    """A batch of the first ``n`` items of ``loader``'s dataset, as the loader would collate it.

    Args:
        loader: a ``torch.utils.data.DataLoader``, or any re-iterable (a list of batches);
            for the latter its first batch is returned.
        n: number of items wanted (fewer if the dataset is smaller).

    Raises:
        ValueError: ``loader`` is a one-shot iterator (reading it would consume the user's
            data), or its dataset is an iterable dataset that is its own iterator.

    Examples:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = TensorDataset(torch.arange(10.0).view(10, 1))
        >>> first_items(DataLoader(ds, batch_size=4, shuffle=True), 3)[0].flatten().tolist()
        [0.0, 1.0, 2.0]
    """
    from torch.utils.data import DataLoader, IterableDataset

    if not isinstance(loader, DataLoader):
        if iter(loader) is loader:
            raise ValueError(
                "the loader is a one-shot iterator: reading the probe batch from it would "
                "take a batch away from training; pass probe_inputs as a tensor instead"
            )
        with preserved_rng(generators=find_generators(loader)):
            return next(iter(loader))
    dataset = loader.dataset
    with preserved_rng(generators=find_generators(dataset, loader.collate_fn)):
        if isinstance(dataset, IterableDataset):
            it = iter(dataset)
            if it is dataset:
                raise ValueError(
                    "the loader's IterableDataset is its own iterator: reading the probe batch "
                    "from it would consume training data; pass probe_inputs as a tensor instead"
                )
            items = list(itertools.islice(it, n))
        elif loader.batch_size is None and loader.batch_sampler is None:
            return loader.collate_fn(dataset[0])  # no automatic batching: an item is a batch
        else:
            size = len(dataset) if hasattr(dataset, "__len__") else n
            items = [dataset[i] for i in range(min(n, size))]
        if not items:
            raise ValueError("the loader's dataset is empty")
        return loader.collate_fn(items)
