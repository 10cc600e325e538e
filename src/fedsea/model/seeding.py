"""Seeded initialisation that neither disturbs nor races with the process's global RNG."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# peft and transformers initialise weights from torch's global RNG. Two threads seeding it
# at once (a server's session opening while a test builds a model) would interleave draws.
_LOCK = threading.RLock()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU RNG seeded to ``seed``, then restore it (thread-safe)."""
    with _LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
