"""Greedy generation through the three parts, each keeping its own KV cache.

This is the in-process form of split generation (KV-cache collaboration): after the
prefill, every step moves one hidden vector per sequence across each cut. The networked
form, sampling and streaming come with the wire (``fedsea.client``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedsea.model.split import SplitModel

# One int32 length per sequence travels with each hidden-state message.
LENGTH_BYTES = 4


@dataclass
class CutTraffic:
    """Bytes that crossed each cut: head -> trunk (client to server) and trunk -> tail (back)."""

    head_to_trunk: int = 0
    trunk_to_tail: int = 0
    messages: int = 0
    per_step: list[int] = field(default_factory=list)

    def record(self, up: torch.Tensor, down: torch.Tensor, lengths: torch.Tensor) -> None:
        up_bytes = up.numel() * up.element_size() + lengths.numel() * LENGTH_BYTES
        down_bytes = down.numel() * down.element_size()
        self.head_to_trunk += up_bytes
        self.trunk_to_tail += down_bytes
        self.messages += 2
        self.per_step.append(up_bytes + down_bytes)


@torch.no_grad()
def split_greedy_generate(
    split: SplitModel,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    traffic: CutTraffic | None = None,
) -> torch.Tensor:
    """Greedy decoding through head, trunk and tail with a KV cache in each.

    Args:
        input_ids: (B, n) left-padded prompts; lengths: (B,) their real lengths.
        max_new_tokens: upper bound on new tokens.
        eos_token_id: a sequence that emits it is finished; later slots get ``pad_token_id``.
        traffic: if given, counts the bytes that crossed each cut.

    Returns:
        (B, k) new token ids, k <= max_new_tokens (generation stops when all are finished).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    parts = (split.head.eval(), split.trunk.eval(), split.tail.eval())
    caches = [part.new_cache() for part in parts]
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    lengths = lengths.clone().to(torch.int64)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    step_ids = input_ids  # (B, n) at the prefill, then (B, 1)
    new_tokens: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        h = parts[0](step_ids, lengths, cache=caches[0])  # (B, n|1, d)
        t = parts[1](h, lengths, cache=caches[1])  # (B, n|1, d)
        logits = parts[2](t, lengths, cache=caches[2], logits_to_keep=1)  # (B, 1, V)
        if traffic is not None:
            traffic.record(h, t, lengths)
        token = logits[:, -1].argmax(dim=-1)  # (B,)
        token = torch.where(finished, torch.full_like(token, pad), token)
        new_tokens.append(token)
        if eos_token_id is not None:
            finished |= token == eos_token_id
        if bool(finished.all()):
            break
        step_ids = token.unsqueeze(1)  # (B, 1)
        lengths = lengths + 1
    return torch.stack(new_tokens, dim=1)
