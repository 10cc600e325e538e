"""How evaluation reaches a model: last-slot logits and greedy generation, unsplit or split.

``evaluate`` talks to a ``Runner``: ``logits(input_ids, lengths, keep)`` returns the logits of
the last ``keep`` slots of a left-padded batch, ``generate(...)`` greedy continuations. Keeping
only the last slots matters: with SmolLM2's 49k-token vocabulary, full logits of a 4k-token
batch would take 800 MB. ``ModelRunner`` wraps an unsplit Hugging Face model (with the same
masks and positions as the split; generation is Hugging Face ``generate``, the reference),
``SplitRunner`` a ``SplitModel`` (head, trunk, tail in turn; generation is the generation loop
with the trunk in process, a KV cache in each part; optionally the release mechanism at the
cut). A networked client can provide its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from transformers import PreTrainedModel

from fedsea.model.masks import check_lengths, padding_mask, position_ids
from fedsea.model.split import SplitModel
from fedsea.training.generation import greedy_generate
from fedsea.training.stepper import LocalStepper


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
        """Logits (B, keep, V) of the last ``keep`` positions of left-padded ``input_ids`` (B, n)."""
        input_ids, lengths = input_ids.to(self.model.device), lengths.to(self.model.device)
        total = input_ids.shape[1]
        check_lengths(lengths, input_ids.shape[0], total)
        out = self.model(
            input_ids=input_ids,
            attention_mask=padding_mask(lengths, total),
            position_ids=position_ids(lengths, total, total),
            use_cache=False,
            logits_to_keep=keep,
        )
        logits: torch.Tensor = out.logits  # (B, keep, V)
        return logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None,
        pad_token_id: int,
    ) -> torch.Tensor:
        """Greedy decoding by Hugging Face ``generate`` (finished rows padded, stops when all are)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        input_ids, lengths = input_ids.to(self.model.device), lengths.to(self.model.device)
        total = input_ids.shape[1]
        check_lengths(lengths, input_ids.shape[0], total)
        out = self.model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=padding_mask(lengths, total),  # (B, n): positions follow from it, as ours do
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos_token_id,  # None: no end token (not the model's default)
            pad_token_id=pad_token_id,
            # Plain greedy, as the split's loop: transformers fills every knob left unset from the
            # checkpoint's generation_config, so the ones that change greedy tokens are pinned.
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_length=0,
        )
        new: torch.Tensor = out[:, total:]  # (B, k) the new tokens
        return new

    def set_eval(self, on: bool) -> bool:
        """Switch eval mode on or off; returns whether it was on (to restore it)."""
        was_eval = not self.model.training
        self.model.train(not on)
        return was_eval


class SplitRunner:
    """A ``SplitModel``: head, trunk and tail in turn, in process.

    Args:
        split: the three parts.
        privatize: the release mechanism at the cut (e.g. a ``Privatizer``), applied to every
            head output before the trunk sees it, when scoring and at every generation step, as
            a deployed client does; ``None``: no noise.
    """

    def __init__(self, split: SplitModel, privatize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.split = split
        self.privatize = privatize

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, lengths: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits (B, keep, V) through head, (noise,) trunk and tail for ``input_ids`` (B, n)."""
        split = self.split
        input_ids, lengths = input_ids.to(split.model.device), lengths.to(split.model.device)
        hidden = split.head(input_ids, lengths)  # (B, n, d) h_p
        hidden = self.privatize(hidden) if self.privatize is not None else hidden
        hidden = split.trunk(hidden, lengths)  # (B, n, d)
        logits: torch.Tensor = split.tail(hidden, lengths, logits_to_keep=keep)  # (B, keep, V)
        return logits

    def generate(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None,
        pad_token_id: int,
    ) -> torch.Tensor:
        """Greedy new tokens (B, k) for left-padded ``input_ids`` (B, n), through the one split loop."""
        stepper = LocalStepper(self.split.trunk)
        input_ids, lengths = input_ids.to(self.split.model.device), lengths.to(self.split.model.device)
        return greedy_generate(
            self.split, stepper, input_ids, lengths, max_new_tokens, eos_token_id, pad_token_id, self.privatize
        )

    def set_eval(self, on: bool) -> bool:
        """Switch eval mode on or off on every part; returns whether it was on."""
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
