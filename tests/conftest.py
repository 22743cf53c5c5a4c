"""Suite-wide settings.

pytest-xdist runs two workers on CI's two cores; one intra-op thread per worker avoids the
OpenMP oversubscription that made CPU convolutions 10-50x slower on this kind of machine.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker() -> None:
    torch.set_num_threads(1)
