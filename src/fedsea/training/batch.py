"""Left-padded training batches and the causal-LM loss.

A batch carries token ids, one length per sequence and labels. The ids and labels never
leave the client; only the lengths travel with the hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Batch:
    """A left-padded batch.

    Attributes:
        input_ids: (B, n) int64, padding on the left.
        lengths: (B,) int64, real tokens per sequence.
        labels: (B, n) int64, the token to predict at each slot's *own* position (shifted inside
            the loss, as in Hugging Face); ``-100`` where no loss is taken (padding, prompts).
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    @property
    def num_targets(self) -> int:
        """Number of predicted tokens (labels after the shift that are not ignored)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device: str | torch.device) -> Batch:
        """The same batch with its (B, n) ids and labels moved to ``device``; the (B,) lengths stay on the host.

        The parts read the lengths on the host to build masks and positions (an unpadded batch
        then takes SDPA's no-mask path, ``fedsea.model.split.no_padding``); on an accelerator that
        read would be a device sync per part, and an unpadded batch would get an explicit mask.
        """
        return Batch(self.input_ids.to(device), self.lengths.cpu(), self.labels.to(device))


def make_batch(
    sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    loss_from: Sequence[int] | None = None,
) -> Batch:
    """Left-pad token sequences into a ``Batch``.

    Args:
        sequences: token ids of each example (prompt and completion together).
        pad_token_id: id written into padding slots (never attended to).
        loss_from: for each sequence, the index of its first token that is a target (the
            completion's start); ``None`` trains on every token but the first (which
            nothing predicts, so it is never a target).
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("make_batch needs at least one sequence and no empty sequence")
    n = max(len(s) for s in sequences)
    batch = len(sequences)
    input_ids = torch.full((batch, n), pad_token_id, dtype=torch.int64)
    labels = torch.full((batch, n), IGNORE_INDEX, dtype=torch.int64)
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    for b, seq in enumerate(sequences):
        ids = torch.as_tensor(list(seq), dtype=torch.int64)
        input_ids[b, n - len(seq) :] = ids
        # A sequence's first token is never a target: no real slot precedes it to predict it
        # (the slot before it is padding, or another row's nothing).
        start = max(1, 0 if loss_from is None else int(loss_from[b]))
        labels[b, n - len(seq) + start :] = ids[start:]
    return Batch(input_ids, lengths, labels)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_targets: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over non-ignored targets (transformers' own loss).

    Args:
        logits: (B, n, V).
        labels: (B, n), unshifted (see ``Batch``).
        num_targets: divide the *sum* of the token losses by this instead of taking their mean
            (a micro-batch's share of a larger batch's mean loss: that batch's target count).
    """
    count = None if num_targets is None else torch.tensor(num_targets)
    return ForCausalLMLoss(
        logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=count, ignore_index=IGNORE_INDEX
    )
