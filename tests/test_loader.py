"""``peek_first_batch``: the first batch of a dataloader, leaving the dataloader and every RNG
exactly as they were."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from erf_monitor.inputs.first_batch import peek_first_batch


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(20, 3, 4, 4, generator=g), torch.arange(20))


class Augmented(Dataset):
    """Random flips from the global RNGs (torch and NumPy), like on-the-fly augmentation."""

    def __init__(self) -> None:
        self.base = data()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x, y = self.base[i]
        if torch.rand(()) < 0.5 or np.random.rand() < 0.5:
            x = x.flip(-1)
        return {"pixel_values": x, "labels": y}


class Batched(TensorDataset):
    """A dataset that fetches many items at once (``__getitems__``), as HF datasets do."""

    calls = 0

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, ...]]:
        Batched.calls += 1
        return [self[i] for i in indices]


def rng_states() -> tuple[Any, ...]:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def assert_same_states(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    assert torch.equal(a[0], b[0])
    assert np.array_equal(a[1], b[1])
    assert a[2] == b[2]


def first_two_batches(loader: Any) -> list[Any]:
    it = iter(loader)
    return [next(it), next(it)]


@pytest.mark.parametrize("generator", [None, 5])
@pytest.mark.parametrize("dataset", ["tensors", "augmented"])
def test_peek_is_the_first_batch_and_changes_nothing(generator: int | None, dataset: str) -> None:
    ds = data() if dataset == "tensors" else Augmented()
    gen = None if generator is None else torch.Generator().manual_seed(generator)
    loader = DataLoader(ds, batch_size=6, shuffle=True, generator=gen)
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    before = rng_states()
    gen_before = None if gen is None else gen.get_state()
    peeked = peek_first_batch(loader)
    assert_same_states(before, rng_states())
    if gen is not None:
        assert torch.equal(gen_before, gen.get_state())
    # The training's own pass sees the same first batch, and the same second one as a run
    # in which nothing peeked (same RNG streams afterwards).
    real = first_two_batches(loader)
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    if gen is not None:
        gen.manual_seed(generator)
    untouched = first_two_batches(DataLoader(ds, batch_size=6, shuffle=True, generator=gen))
    flat = lambda b: b if isinstance(b, (list, tuple)) else list(b.values())  # noqa: E731
    for got, want in zip(flat(peeked), flat(real[0])):
        assert torch.equal(got, want)
    for batch, ref in zip(real, untouched):
        for got, want in zip(flat(batch), flat(ref)):
            assert torch.equal(got, want)


def test_getitems_and_iterable_datasets() -> None:
    ds = Batched(*data().tensors)
    _, y = peek_first_batch(DataLoader(ds, batch_size=4))
    assert Batched.calls == 1 and torch.equal(y, torch.arange(4))

    class Stream(IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield from (torch.full((3, 4, 4), float(i)) for i in range(10))

    batch = peek_first_batch(DataLoader(Stream(), batch_size=3))
    assert batch.shape == (3, 3, 4, 4) and batch[2, 0, 0, 0] == 2.0
    with pytest.raises(ValueError, match="empty"):
        peek_first_batch(DataLoader(TensorDataset(torch.zeros(0, 3, 4, 4)), batch_size=2))
    with pytest.raises(ValueError, match="no dataset"):
        peek_first_batch([torch.zeros(2, 3, 4, 4)])


def test_accelerate_prepared_loader_is_not_iterated() -> None:
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True)
    loader = acc.prepare(DataLoader(data(), batch_size=6, shuffle=True))
    iteration = loader.iteration
    peeked = peek_first_batch(loader)
    assert loader.iteration == iteration  # the Accelerate wrapper was never iterated
    x, y = next(iter(loader))
    assert torch.equal(peeked[1], y) and torch.equal(peeked[0], x)
