"""Attention-mask compression: rebuild masks and position ids from lengths.

Only one integer per sequence (its number of real tokens) crosses a cut. Every part
rebuilds the same 2-D padding mask and position ids from it, then lets transformers'
own ``create_causal_mask`` build the 4-D causal mask for the configured attention
implementation. The n x n mask itself (32 MiB per 4096-token sample in fp16) never
travels.

Conventions (the same as Hugging Face ``generate``):
- sequences are left-padded: in a batch of padded length T, sequence b occupies the last
  ``lengths[b]`` slots;
- the first real token has position 0; padding slots get position 1 (never attended to,
  the value only has to be a valid rotary index).
"""

from __future__ import annotations

import torch

from fedsea.errors import InvalidInputError


def check_lengths(lengths: torch.Tensor, batch: int, total_len: int, *, min_len: int = 1) -> None:
    """Validate a lengths vector (batch,) for ``batch`` sequences padded to ``total_len``.

    Raises:
        InvalidInputError: naming ``lengths`` when its shape, dtype or values are wrong.
    """
    if not isinstance(lengths, torch.Tensor):
        raise InvalidInputError("lengths", f"expected a tensor, got {type(lengths).__name__}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise InvalidInputError("lengths", f"expected shape ({batch},), got {tuple(lengths.shape)}")
    if lengths.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise InvalidInputError("lengths", f"expected an integer dtype, got {lengths.dtype}")
    if batch == 0:
        return
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < min_len or hi > total_len:
        raise InvalidInputError(
            "lengths", f"every length must be in [{min_len}, {total_len}], got min {lo} and max {hi}"
        )


def check_finite(tensor: torch.Tensor, field: str) -> None:
    """Raise ``InvalidInputError`` naming ``field`` if ``tensor`` holds NaN or Inf (a device sync off the CPU)."""
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidInputError(field, "contains NaN or Inf")


def padding_mask(lengths: torch.Tensor, total_len: int) -> torch.Tensor:
    """2-D left-padding mask, 1 on real tokens.

    Args:
        lengths: (B,) number of real tokens of each sequence (including any cached past).
        total_len: T, the padded length (past + new tokens).

    Returns:
        (B, T) int64 tensor.
    """
    slots = torch.arange(total_len, device=lengths.device)  # (T,)
    first_real = (total_len - lengths.to(torch.int64)).unsqueeze(1)  # (B, 1)
    return (slots.unsqueeze(0) >= first_real).to(torch.int64)  # (B, T)


def position_ids(lengths: torch.Tensor, total_len: int, new_tokens: int) -> torch.Tensor:
    """Rotary position ids of the last ``new_tokens`` slots of a left-padded batch.

    Matches ``generate``'s ``attention_mask.cumsum(-1) - 1`` with padding filled by 1.

    Returns:
        (B, new_tokens) int64 tensor.
    """
    mask = padding_mask(lengths, total_len)  # (B, T)
    pos = mask.cumsum(-1) - 1  # (B, T)
    pos = pos.masked_fill(mask == 0, 1)
    return pos[:, total_len - new_tokens :]  # (B, n)
