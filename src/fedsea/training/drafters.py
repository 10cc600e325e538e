"""Drafters for split speculative decoding: cheap guesses of the next few tokens, made on the client.

A drafter proposes up to k tokens that follow the text so far; the speculative loop
(``fedsea.training.speculative``) checks them all with one pass through head, trunk and tail (one
round trip to the trunk server) and keeps the longest prefix the split model agrees with. Every
drafter runs on the client alone: the text never leaves it, and the trunk's compute is not needed.

- ``PromptLookupDrafter``: no model. The last n tokens are looked up in the prompt and the text
  generated so far; the tokens that followed the latest earlier occurrence are proposed (the idea
  of transformers' ``PromptLookupCandidateGenerator``, ``prompt_lookup_num_tokens``). It shines
  where the answer copies the input: extractive QA, summaries quoting the article, code edits.
- ``BridgeDrafter`` (``fedsea.training.bridge_drafter``, ``"bridge:PATH"``): self-speculative,
  the client's own head and tail with the trunk replaced by a small trained bridge.
- ``ModelDrafter``: a separate small causal LM sharing the tokenizer (any Hugging Face model),
  run greedily or sampled with the generation's own logits processors, with its own KV cache.

A drafter is deterministic (``Draft.probs`` is None: its proposal is a point mass, for the
speculative acceptance rule) or gives the distribution q each draft token was sampled from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from transformers import DynamicCache

from fedsea.training.draft import Draft, Scores, pick

if TYPE_CHECKING:
    from fedsea.model.split import SplitModel

__all__ = ["BRIDGE_PREFIX", "PROMPT_LOOKUP_MIN_NGRAM", "PROMPT_LOOKUP_NGRAM", "Draft", "Drafter", "ModelDrafter",
           "PromptLookupDrafter", "Scores", "make_drafter"]  # fmt: skip

# Default n-gram length that prompt lookup matches (transformers' default for
# ``max_matching_ngram_size`` is 2; 3 proposes fewer but better drafts on prose; shorter
# n-grams, down to ``PROMPT_LOOKUP_MIN_NGRAM``, are tried when the longest finds nothing).
PROMPT_LOOKUP_NGRAM = 3
# The shortest n-gram whose match proposes anything (vLLM's ``prompt_lookup_min``). On SmolLM2's
# XSum and QuAC answers a unigram match's drafts were kept 1 time in 5, a trigram's 3 in 5, and
# a verification step of 2-11 tokens costs 1.5-2.1x a one-token step on a CPU (BENCHMARKS.md,
# "where the speculative targets stand"): there only a full match pays for its step.
PROMPT_LOOKUP_MIN_NGRAM = 3
# ``GenerationConfig.speculative = "bridge:PATH"``: the self-speculative drafter with that bridge.
BRIDGE_PREFIX = "bridge:"


class Drafter(Protocol):
    """Proposes the tokens after ``ids`` (the prompt's real tokens and every token generated)."""

    def propose(self, ids: list[int], k: int, scores: Scores, generator: torch.Generator | None) -> Draft:
        """Up to ``k`` tokens; ``generator`` is given when sampling (None: greedy)."""
        ...


class PromptLookupDrafter:
    """Propose the continuation of the latest earlier occurrence of the last ``ngram`` tokens.

    Tries n = ``ngram``, ``ngram`` - 1, ..., ``min_ngram`` and takes the first n with a match
    that has a continuation; among matches, the one with the longest continuation (up to k), the
    latest of those (the text being written is the likeliest to repeat itself). A full ``ngram``
    match proposes up to k tokens, a shorter n-gram match at most n; no match of at least
    ``min_ngram`` tokens proposes nothing (a plain one-token step). Deterministic: ``probs`` is None.

    Args:
        ngram: the longest n-gram to match (>= 1).
        min_ngram: the shortest (1 <= ``min_ngram`` <= ``ngram``; 1 is transformers' behaviour).
    """

    def __init__(self, ngram: int = PROMPT_LOOKUP_NGRAM, min_ngram: int = PROMPT_LOOKUP_MIN_NGRAM) -> None:
        if ngram < 1:
            raise ValueError(f"prompt_lookup_ngram must be >= 1, got {ngram}")
        if not 1 <= min_ngram <= ngram:
            raise ValueError(f"prompt_lookup_min_ngram must be in [1, prompt_lookup_ngram = {ngram}], got {min_ngram}")
        self.ngram, self.min_ngram = ngram, min_ngram

    def propose(self, ids: list[int], k: int, scores: Scores, generator: torch.Generator | None) -> Draft:
        """Up to ``k`` tokens copied from after a match of the last n-gram (``scores`` unused)."""
        if k < 1 or len(ids) < 2:
            return Draft([])
        seq = torch.tensor(ids, dtype=torch.int64)  # (T,)
        for n in range(min(self.ngram, len(ids) - 1), self.min_ngram - 1, -1):
            windows = seq.unfold(0, n, 1)  # (T - n + 1, n): every n-gram, by start
            # The last window is the n-gram itself; a match must leave at least one token after it.
            hits = (windows[:-1] == seq[-n:]).all(dim=1).nonzero().flatten()
            if hits.numel():
                # The longest continuation (up to k), the latest among equals: in a repetition the
                # latest match is right behind the end and would give a single token.
                start = max((min(k, len(ids) - h - n), h) for h in hits.tolist())[1] + n
                # A match shorter than the n-gram is weak evidence (on SmolLM2's XSum and QuAC
                # answers, a unigram match's drafts were kept 1 time in 5, a trigram's 3 in 5):
                # it proposes at most n tokens, so misses cost little compute.
                return Draft(ids[start : start + (k if n == self.ngram else min(k, n))])
        return Draft([])


class ModelDrafter:
    """A small causal LM sharing the target's tokenizer, with its own KV cache on the client.

    The cache holds the ids it has seen; each ``propose`` crops it to the longest prefix it
    shares with the new ``ids`` (the rejected drafts drop out) and feeds the rest, then runs k
    steps. Its logits are cut (or padded with -inf) to the target's vocabulary ``vocab_size``, so
    it never proposes an id the target does not have. Not thread-safe: one generation at a time.

    Args:
        model: a Hugging Face causal LM (``model(input_ids, past_key_values=...)`` -> logits).
        vocab_size: the target model's vocabulary (its lm_head rows).
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int) -> None:
        self.model = model.eval()
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device
        self.cache = DynamicCache()
        self.cached: list[int] = []  # ids whose keys and values are in ``cache``

    def _fit(self, logits: torch.Tensor) -> torch.Tensor:
        """(1, V_draft) -> (1, vocab_size) float logits of the target's vocabulary."""
        logits = logits.float()[:, : self.vocab_size]
        if logits.shape[1] < self.vocab_size:
            pad = logits.new_full((1, self.vocab_size - logits.shape[1]), float("-inf"))
            logits = torch.cat([logits, pad], dim=1)
        return logits

    @torch.no_grad()
    def propose(self, ids: list[int], k: int, scores: Scores, generator: torch.Generator | None) -> Draft:
        """``k`` tokens from the draft model, sampled from its processed q when ``generator`` is given."""
        if k < 1:
            return Draft([])
        common = 0
        for a, b in zip(self.cached, ids[:-1], strict=False):  # at least one id is fed, for its logits
            if a != b:
                break
            common += 1
        if common == 0:
            self.cache, self.cached = DynamicCache(), []
        elif common < len(self.cached):
            self.cache.crop(common - len(self.cached))  # a negative count: remove that many slots
            self.cached = self.cached[:common]
        feed, seq = ids[common:], list(ids)
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        for _ in range(k):
            out: Any = self.model(
                input_ids=torch.tensor([feed], device=self.device), cache=self.cache, use_cache=True, logits_to_keep=1
            )
            self.cached += feed
            device = generator.device if generator is not None else torch.device("cpu")
            logits = self._fit(out.logits[:, -1]).to(device)  # (1, V)
            token, q = pick(scores(torch.tensor([seq], device=device), logits), generator)
            if q is not None:
                probs.append(q)
            tokens.append(token)
            seq.append(token)
            feed = [token]
        return Draft(tokens, torch.stack(probs) if probs else None)


def make_drafter(
    speculative: object,
    vocab_size: int,
    ngram: int,
    device: torch.device,
    split: SplitModel | None = None,
    min_ngram: int = PROMPT_LOOKUP_MIN_NGRAM,
) -> Drafter:
    """The drafter ``GenerationConfig.speculative`` names.

    Args:
        speculative: ``"prompt-lookup"``; ``"bridge:PATH"``, the self-speculative drafter with the
            bridge file at PATH (``fedsea.training.bridge_drafter``; needs ``split``); a model
            source for ``fedsea.load_model`` (a packaged name, a Hugging Face folder,
            ``random:...``), loaded once per process; or a ready ``Drafter`` object.
        vocab_size: the target's vocabulary; ngram, min_ngram: prompt lookup's longest and
            shortest n; device: where a loaded draft model goes; split: the client's model (its
            head and tail draft with a bridge).
    """
    if isinstance(speculative, str):
        if speculative == "prompt-lookup":
            return PromptLookupDrafter(ngram, min(min_ngram, ngram))
        if speculative.startswith(BRIDGE_PREFIX):
            if split is None:
                raise ValueError("the bridge drafter needs the client's split model")
            from fedsea.training.bridge import load_bridge
            from fedsea.training.bridge_drafter import BridgeDrafter

            path = speculative.removeprefix(BRIDGE_PREFIX)
            return BridgeDrafter(load_bridge(path, split.model, split.head_layers, split.tail_layers), split)
        return ModelDrafter(_load_draft_model(speculative, str(device)), vocab_size)
    if hasattr(speculative, "propose"):
        return cast(Drafter, speculative)
    raise ValueError(f"speculative must be 'prompt-lookup', a draft model or a drafter, got {speculative!r}")


_DRAFT_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def _load_draft_model(source: str, device: str) -> torch.nn.Module:
    """Load a draft model once per (source, device): a chat reuses it every turn."""
    key = (source, device)
    if key not in _DRAFT_MODELS:
        from fedsea.model.load import load_model

        _DRAFT_MODELS[key] = load_model(source, torch.float32, device)
    return _DRAFT_MODELS[key]
