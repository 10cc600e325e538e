"""Length-sorted, left-padded batches under a token budget.

Sorting by length before batching keeps sequences of similar length together, so that
little of each batch is padding; a token budget (batch size x longest sequence) rather than
a fixed batch size keeps memory flat between short and long inputs. The longest batch
comes first, so a budget that does not fit fails at once rather than at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedsea.errors import InvalidInputError


def length_sorted_batches(
    lengths: Sequence[int], max_tokens: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Group indices into batches of similar length, longest first.

    Args:
        lengths: the (padded-to) length of each item, e.g. prompt + new tokens for generation.
        max_tokens: budget of one batch, counted as its size times its longest item; an item
            longer than the budget gets a batch of its own.
        max_batch_size: an optional cap on items per batch.

    Returns:
        Lists of indices into ``lengths``; every index appears exactly once. Within a batch
        and across batches the lengths do not increase; ties keep their input order.
    """
    if max_tokens < 1:
        raise InvalidInputError("max_tokens", f"must be >= 1, got {max_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise InvalidInputError("max_batch_size", f"must be >= 1 or None, got {max_batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        size = max(1, int(lengths[i]))
        width = max(longest, size)
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or (len(current) + 1) * width > max_tokens):
            batches.append(current)
            current, width = [], size
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the slots of ``batches`` that are padding (0 for no padding)."""
    slots = sum(len(b) * max(int(lengths[i]) for i in b) for b in batches if b)
    real = sum(int(lengths[i]) for b in batches for i in b)
    return 1.0 - real / slots if slots else 0.0


def pad_left(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token sequences.

    Returns:
        ``input_ids`` (B, n) int64 with padding on the left, and ``lengths`` (B,) int64.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise InvalidInputError("sequences", "need at least one sequence and no empty one")
    n = max(len(s) for s in sequences)
    ids = np.full((len(sequences), n), pad_token_id, dtype=np.int64)
    for b, seq in enumerate(sequences):
        ids[b, n - len(seq) :] = seq
    return torch.from_numpy(ids), torch.tensor([len(s) for s in sequences], dtype=torch.int64)
