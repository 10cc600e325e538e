"""``GenerationConfig``: how to generate (``fedsea.training.generation`` runs it).

Apart from the loop, and without torch or transformers at import (``processors`` imports
transformers when called), so that the command line can show its defaults in ``fedsea generate
--help`` in a fraction of a second. ``fedsea.training.generation`` re-exports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers.generation.logits_process import LogitsProcessorList


# Default k per drafter (``GenerationConfig.num_draft_tokens`` None): prompt lookup's drafts are
# free to make, a model's or a bridge's cost a forward pass each (BENCHMARKS.md, issue 17).
PROMPT_LOOKUP_DRAFT_TOKENS = 10
MODEL_DRAFT_TOKENS = 6


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate.

    Args:
        max_new_tokens: new tokens per sequence, at most.
        do_sample: sample from the (processed) distribution instead of taking the argmax.
        temperature, top_k, top_p: sampling warpers (top_k=0 and top_p=1 disable them).
        repetition_penalty: > 1 discourages tokens already in the sequence (1 disables).
        seed: seed of the sampling generator (reproducible sampling).
        stop: strings that end a sequence; the returned text stops before them.
        eos_token_id: ids that end a sequence (default: the tokenizer's EOS).
        use_cache: KV caches on every part; False is the naive baseline.
        drop_finished: stop computing rows that have finished (otherwise, as Hugging Face
            does, they go on being fed ``pad_token_id``).
        pad_token_id: fed to finished rows when they are not dropped (default: the first EOS id).
        speculative: speculative decoding's drafter (``fedsea.training.speculative``; batch 1, KV
            caches on): ``"prompt-lookup"`` (n-gram matches in the prompt and the text so far),
            a draft model source for ``fedsea.load_model`` sharing the tokenizer, or a
            ``fedsea.training.drafters.Drafter``; None (default) generates one token per step.
        num_draft_tokens: k, the most draft tokens checked per round trip; None (default) is 10
            for prompt lookup (its drafts cost nothing to make, and on a CPU a step of 11 tokens
            costs about what one of 7 does) and 6 for a bridge or a draft model (each draft token
            costs the client a forward pass). The loop asks for fewer while drafts miss.
        prompt_lookup_ngram: the longest n-gram prompt lookup matches (default 3).
        prompt_lookup_min_ngram: the shortest n-gram whose match proposes a draft (default 3: only
            a full match; capped at ``prompt_lookup_ngram``). Lower it where a step of several
            tokens costs about what one does (a GPU): shorter matches then add tokens per round
            trip; on a CPU their misses cost more than they save (BENCHMARKS.md).
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_token_id: tuple[int, ...] | None = None
    use_cache: bool = True
    drop_finished: bool = True
    pad_token_id: int | None = None
    speculative: object = None
    num_draft_tokens: int | None = None
    prompt_lookup_ngram: int = 3
    prompt_lookup_min_ngram: int = 3

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k} and {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        draft_tokens = 1 if self.num_draft_tokens is None else self.num_draft_tokens
        if draft_tokens < 1 or self.prompt_lookup_ngram < 1 or self.prompt_lookup_min_ngram < 1:
            raise ValueError(
                f"num_draft_tokens, prompt_lookup_ngram and prompt_lookup_min_ngram must be >= 1, got "
                f"{self.num_draft_tokens}, {self.prompt_lookup_ngram} and {self.prompt_lookup_min_ngram}"
            )
        object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.eos_token_id, int):  # callers pass a bare id too, whatever the annotation says
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))  # type: ignore[unreachable]

    def draft_tokens(self) -> int:
        """k: ``num_draft_tokens``, or the drafter's default when it is None."""
        if self.num_draft_tokens is not None:
            return self.num_draft_tokens
        return PROMPT_LOOKUP_DRAFT_TOKENS if self.speculative == "prompt-lookup" else MODEL_DRAFT_TOKENS

    def processors(self) -> LogitsProcessorList:
        """Transformers' logits processors for these settings (none for plain greedy decoding)."""
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


__all__ = ["GenerationConfig"]


@dataclass(frozen=True)
class GenerationStep:
    """One step's new tokens: original row index -> token id (running rows only)."""

    step: int
    tokens: dict[int, int]
    finished: tuple[int, ...]  # rows that finished at this step


def first_stop(text: str, stops: Sequence[str]) -> int:
    """Where the first of ``stops`` starts in ``text`` (-1: none)."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else -1
