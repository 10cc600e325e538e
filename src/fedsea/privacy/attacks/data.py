"""What an attacker works with: token sequences, their head outputs, and the release mechanism.

The attacker is the honest-but-curious server (possibly colluding with a client). It knows
the public base model, the cut point p and the noise mechanism (sigma, clip norm, shape),
never the victim's text or adapters. It builds training pairs by running the public head
on public auxiliary text and passing the outputs through its own copy of the mechanism
(fresh noise, its own seed); it observes the victim's released h~_p.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedsea.model.masks import padding_mask
from fedsea.model.split import Head

# A release mechanism: clean h_p (B, n, d) -> what leaves the client (B, n, d).
Mechanism = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class HiddenSet:
    """Left-padded token sequences and their clean head outputs.

    Attributes:
        input_ids: (B, n) int64, left-padded.
        lengths: (B,) int64, real tokens per sequence.
        hidden: (B, n, d) float32, the head's output h_p (detached, not noised).
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    hidden: torch.Tensor

    def __post_init__(self) -> None:
        b, n = self.input_ids.shape
        if self.lengths.shape != (b,) or self.hidden.shape[:2] != (b, n):
            raise ValueError(
                f"input_ids {tuple(self.input_ids.shape)}, lengths {tuple(self.lengths.shape)} and hidden "
                f"{tuple(self.hidden.shape)} disagree"
            )

    @property
    def mask(self) -> torch.Tensor:
        """(B, n) bool, True at real tokens."""
        return padding_mask(self.lengths, self.input_ids.shape[1]).bool()

    @property
    def num_tokens(self) -> int:
        """Number of real (non-padding) tokens in the set."""
        return int(self.lengths.sum())

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Index tensors (<= batch_size,) of sequences, in order or shuffled if a generator is given."""
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        yield from order.split(batch_size)


def pad_left(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token sequences: (input_ids (B, n), lengths (B,))."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("sequences must be non-empty and hold no empty sequence")
    n = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), n), pad_token_id, dtype=torch.int64)
    for b, seq in enumerate(sequences):
        ids[b, n - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.int64)
    return ids, torch.tensor([len(s) for s in sequences], dtype=torch.int64)


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int, min_tokens: int = 2
) -> list[list[int]]:
    """Tokenize texts (no special tokens), cut each to ``max_tokens``, drop those under ``min_tokens``."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) >= min_tokens:
            out.append(list(ids))
    return out


@torch.no_grad()
def head_states(head: Head, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 16) -> HiddenSet:
    """Run ``head`` on token sequences, padded to one length, and keep the clean outputs.

    Args:
        head: the head to run (the attacker's public one, or the victim's).
        sequences: token ids per sequence.
        pad_token_id: id written into padding slots.
        batch_size: sequences per forward pass.
    """
    input_ids, lengths = pad_left(sequences, pad_token_id)
    was_training = head.training
    head.eval()
    device = head.embed_tokens.weight.device
    chunks = []
    for idx in torch.arange(len(sequences)).split(batch_size):
        chunks.append(head(input_ids[idx].to(device), lengths[idx].to(device)).float().cpu())  # (b, n, d)
    head.train(was_training)
    return HiddenSet(input_ids=input_ids, lengths=lengths, hidden=torch.cat(chunks))


@torch.no_grad()
def release(states: HiddenSet, mechanism: Mechanism, batch_size: int = 64) -> torch.Tensor:
    """What leaves the client for each sequence: ``mechanism(h_p)``, (B, n, d), detached."""
    return torch.cat([mechanism(states.hidden[idx]) for idx in torch.arange(len(states)).split(batch_size)])
