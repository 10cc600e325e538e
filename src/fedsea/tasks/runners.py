"""How evaluation reaches a model: last-slot logits and greedy generation, unsplit or split.

``evaluate`` talks to a ``Runner``: ``logits(input_ids, lengths, keep)`` returns the logits of
the last ``keep`` slots of a left-padded batch, ``generate(...)`` greedy continuations. Keeping
only the last slots matters: with SmolLM2's 49k-token vocabulary, full logits of a 4k-token
batch would take 800 MB. ``ModelRunner`` wraps an unsplit Hugging Face model (with the same
masks and positions as the split), ``SplitRunner`` a ``SplitModel`` (head, trunk, tail in
turn, generation with a KV cache in each part). A networked client can provide its own.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from transformers import DynamicCache, PreTrainedModel

from fedsea.model.generate import split_greedy_generate
from fedsea.model.masks import check_lengths, padding_mask, position_ids
from fedsea.model.split import SplitModel


@runtime_checkable
class Runner(Protocol):
    """What ``evaluate`` needs from a model."""

    def logits(self, input_ids: torch.Tensor, lengths: torch.Tensor, keep: int) -> torch.Tensor:
        """(B, n) left-padded ids and (B,) lengths -> logits (B, keep, V) of the last ``keep`` slots."""
        ...

    def generate(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None,
        pad_token_id: int,
    ) -> torch.Tensor:
        """Greedy continuation (B, k), k <= max_new_tokens; finished rows are padded."""
        ...

    def set_eval(self, on: bool) -> bool:
        """Switch dropout off (``on=True``) or back; return the previous eval state."""
        ...


class ModelRunner:
    """An unsplit causal LM (the centralized model)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, lengths: torch.Tensor, keep: int) -> torch.Tensor:
        total = input_ids.shape[1]
        check_lengths(lengths, input_ids.shape[0], total)
        out = self.model(
            input_ids=input_ids,
            attention_mask=padding_mask(lengths, total),
            position_ids=position_ids(lengths, total, total),
            use_cache=False,
            logits_to_keep=keep,
        )
        return out.logits  # (B, keep, V)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None,
        pad_token_id: int,
    ) -> torch.Tensor:
        """Greedy decoding with one KV cache (the conventions of ``split_greedy_generate``)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_lengths(lengths, input_ids.shape[0], input_ids.shape[1])
        cache = DynamicCache(config=self.model.config)
        lengths = lengths.clone().to(torch.int64)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        total, step_ids = input_ids.shape[1], input_ids  # (B, n) at the prefill, then (B, 1)
        new_tokens: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            out = self.model(
                input_ids=step_ids,
                attention_mask=padding_mask(lengths, total),
                position_ids=position_ids(lengths, total, step_ids.shape[1]),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            token = out.logits[:, -1].argmax(dim=-1)  # (B,)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            new_tokens.append(token)
            if eos_token_id is not None:
                finished |= token == eos_token_id
            if bool(finished.all()):
                break
            step_ids = token.unsqueeze(1)  # (B, 1)
            lengths, total = lengths + 1, total + 1
        return torch.stack(new_tokens, dim=1)

    def set_eval(self, on: bool) -> bool:
        was_eval = not self.model.training
        self.model.train(not on)
        return was_eval


class SplitRunner:
    """A ``SplitModel``: head, trunk and tail in turn (in process, without noise)."""

    def __init__(self, split: SplitModel) -> None:
        self.split = split

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, lengths: torch.Tensor, keep: int) -> torch.Tensor:
        split = self.split
        hidden = split.trunk(split.head(input_ids, lengths), lengths)  # (B, n, d)
        return split.tail(hidden, lengths, logits_to_keep=keep)  # (B, keep, V)

    def generate(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None,
        pad_token_id: int,
    ) -> torch.Tensor:
        return split_greedy_generate(
            self.split, input_ids, lengths, max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id
        )

    def set_eval(self, on: bool) -> bool:
        was_eval = not self.split.model.training
        self.split.model.train(not on)  # the parts are views of this model's modules
        return was_eval


def as_runner(model: PreTrainedModel | SplitModel | Runner) -> Runner:
    """Wrap a model or a split (a ``Runner`` is returned as it is)."""
    if isinstance(model, SplitModel):
        return SplitRunner(model)
    if isinstance(model, PreTrainedModel):
        return ModelRunner(model)
    if isinstance(model, Runner):
        return model
    raise TypeError(f"expected a PreTrainedModel, a SplitModel or a Runner, got {type(model).__name__}")
