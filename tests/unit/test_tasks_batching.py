"""Length-sorted, left-padded batches under a token budget."""

from __future__ import annotations

import random

import pytest
import torch

from fedsea.errors import InvalidInputError
from fedsea.tasks import length_sorted_batches, pad_left, padding_fraction


def test_batches_respect_the_budget_and_cover_every_item():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(200)]
    batches = length_sorted_batches(lengths, max_tokens=1024)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(200))
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 1024
    # longest first, non-increasing
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    # far less padding than batches of the same sizes in input order
    unsorted, start = [], 0
    for b in batches:
        unsorted.append(list(range(start, start + len(b))))
        start += len(b)
    assert padding_fraction(lengths, batches) < 0.1 < padding_fraction(lengths, unsorted)


def test_batch_size_cap_and_oversized_items():
    batches = length_sorted_batches([3, 3, 3, 3, 3], max_tokens=100, max_batch_size=2)
    assert batches == [[0, 1], [2, 3], [4]]
    assert length_sorted_batches([50, 10, 10], max_tokens=20) == [[0], [1, 2]]  # 50 > budget: alone
    with pytest.raises(InvalidInputError, match="max_tokens"):
        length_sorted_batches([1], max_tokens=0)


def test_pad_left():
    ids, lengths = pad_left([[5, 6, 7], [8]], pad_token_id=0)
    assert torch.equal(ids, torch.tensor([[5, 6, 7], [0, 0, 8]]))
    assert torch.equal(lengths, torch.tensor([3, 1])) and ids.dtype == torch.int64
    with pytest.raises(InvalidInputError):
        pad_left([[1], []], 0)
