"""Finding the image tensor in tensor / tuple / list / dict batches."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from erf_monitor.inputs.batch import describe_batch, find_image

X = torch.randn(4, 3, 8, 8)
Y = torch.randint(0, 10, (4,))


def test_bare_tensor() -> None:
    assert find_image(X) is X


@pytest.mark.parametrize(
    "batch",
    [
        (X, Y),
        [Y, X],
        (torch.zeros(4), X, torch.zeros(4, 3, 8, 8, dtype=torch.long)),
        {"label": Y, "image": X},
        {"label": Y, "pixel_values": X},
        {"Image": X, "mask": torch.zeros(4, 1, 8, 8)},  # case-insensitive key
        {"target": Y, "frames": X},  # unknown key: first floating >=3-dim tensor
        ((X, Y), {"meta": 1}),  # nested one level
        {"inputs": {"img": X}, "y": Y},
    ],
)
def test_structures(batch: object) -> None:
    assert find_image(batch) is X


def test_known_key_wins_over_order() -> None:
    other = torch.randn(4, 1, 8, 8)
    assert find_image({"mask": other, "image": X}) is X


def test_namedtuple() -> None:
    Batch = namedtuple("Batch", ["y", "x"])
    assert find_image(Batch(Y, X)) is X


def test_input_key_overrides() -> None:
    other = torch.randn(4, 1, 8, 8)
    assert find_image({"image": X, "depth": other}, input_key="depth") is other
    assert find_image((X, other), input_key=1) is other
    assert find_image({"a": {"b": other}}, input_key=lambda b: b["a"]["b"]) is other


def test_errors_describe_the_batch() -> None:
    with pytest.raises(ValueError, match=r"tuple\(Tensor\[4\] int64, Tensor\[4, 5\] float32\)"):
        find_image((Y, torch.randn(4, 5)))
    with pytest.raises(ValueError, match="input_key='missing' is not in the batch"):
        find_image({"image": X}, input_key="missing")
    with pytest.raises(ValueError, match="input_key"):
        find_image({"image": X, "label": Y}, input_key="label")
    with pytest.raises(ValueError, match="raised"):
        find_image({"image": X}, input_key=lambda b: b["nope"])
    with pytest.raises(ValueError, match="no floating-point tensor"):
        find_image("not a batch")


def test_describe_truncates() -> None:
    text = describe_batch({f"k{i}": i for i in range(20)})
    assert text.endswith(", ...})")
