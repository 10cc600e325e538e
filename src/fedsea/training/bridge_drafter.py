"""The self-speculative drafter: the client's own head and tail, the trunk replaced by a bridge.

Draft token i (at slot n + i, n the slots already verified) goes through the client's head
(its real KV cache), the bridge (``fedsea.training.bridge``: a guess of the trunk's output from
h_p and the previous slot's trunk output) and the client's tail (its real KV cache); the caches
are cut back to n afterwards, so the verification step finds them as it left them. The bridge's
own cache is kept for the verified slots only, built from the trunk's real outputs
(``SplitDecoder.states``), never from its own guesses.

Nothing is sent: drafting is the client's compute alone (p + q + 1 blocks and the LM head per
draft token), and it needs neither the trunk's weights nor a second model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fedsea.model.cache import crop_cache
from fedsea.training.draft import Draft, Scores, pick

if TYPE_CHECKING:
    from transformers import DynamicCache

    from fedsea.model.split import SplitModel
    from fedsea.training.bridge import Bridge
    from fedsea.training.decoder import SplitDecoder


class BridgeDrafter:
    """Drafts with ``split``'s head and tail and ``bridge``; ``attach`` it to the generation's decoder.

    Greedy (argmax of the processed logits) or sampled (``Draft.probs`` holds each q). One
    generation at a time; rows with left padding get no drafts (speculation is batch 1, and a
    single prompt has none).
    """

    def __init__(self, bridge: Bridge, split: SplitModel) -> None:
        self.bridge = bridge.eval()
        self.head, self.tail = split.head, split.tail
        self.decoder: SplitDecoder | None = None
        head: Any = self.tail.lm_head
        self.vocab_size = int(head.weight.shape[0])
        # The LM head's rows of the draft vocabulary (N, d), copied once; a LoRA-wrapped head
        # (not a plain Linear) is read whole.
        self.rows: torch.Tensor | None = None
        if bridge.draft_vocab is not None and type(head) is torch.nn.Linear and getattr(head, "bias", None) is None:
            self.rows = head.weight.detach()[bridge.draft_vocab].contiguous()

    def _logits(self, guess: torch.Tensor, lengths: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """(1, V) float logits after the guess (1, 1, d): -inf outside the bridge's draft vocabulary."""
        normed = self.tail.normed(guess, lengths, cache, keep=1)[:, -1]  # (1, d)
        if self.rows is None:
            return self.tail.cap_logits(self.tail.lm_head(normed)).float()
        assert self.bridge.draft_vocab is not None
        sub = self.tail.cap_logits(normed @ self.rows.T).float()  # (1, N): N rows of the LM head, not V
        full = sub.new_full((1, self.vocab_size), float("-inf"))
        full[:, self.bridge.draft_vocab] = sub
        return full

    def attach(self, decoder: SplitDecoder) -> None:
        """Start a generation: the decoder whose caches and trunk outputs the drafts build on."""
        self.decoder = decoder
        self.cache = self.bridge.new_cache()
        self.real = 0  # slots of ``cache``, all built from the trunk's real outputs
        self.prev: torch.Tensor | None = None  # (1, 1, d) the trunk's output at slot real - 1

    def _catch_up(self, decoder: SplitDecoder) -> bool:
        """Feed the bridge the slots verified since the last draft; False if their states are gone."""
        n = decoder.length
        if decoder.states is None:
            return self.real == n
        clean, trunk = decoder.states  # (1, m, d) each: slots [n - m, n)
        start = n - clean.shape[1]
        if self.real > n:  # cannot happen with the speculative loop (it never rewinds verified slots)
            crop_cache(self.cache, self.real - n)
            self.real = n
        if self.real < start:
            return False
        fresh_h, fresh_t = clean[:, self.real - start :], trunk[:, self.real - start :]
        if fresh_h.shape[1]:
            first = self.prev if self.prev is not None else torch.zeros_like(fresh_t[:, :1])
            prev = torch.cat([first, fresh_t[:, :-1]], dim=1)  # (1, m', d): each slot's predecessor
            positions = torch.arange(self.real, n, device=prev.device)[None]  # (1, m')
            self.bridge(fresh_h, prev, positions, self.cache)
            self.real, self.prev = n, fresh_t[:, -1:]
        return True

    @torch.no_grad()
    def propose(self, ids: list[int], k: int, scores: Scores, generator: torch.Generator | None) -> Draft:
        """Up to ``k`` tokens after ``ids`` (its last token is not yet in the decoder's caches)."""
        decoder = self.decoder
        if decoder is None:
            raise RuntimeError("BridgeDrafter.propose before attach: the speculative loop attaches it")
        if k < 1 or decoder.caches is None or decoder.ids.shape[0] != 1:
            return Draft([])
        n = decoder.length
        if int(decoder.lengths[0]) != n or len(ids) != n + 1:  # padded, or out of step with the decoder
            return Draft([])
        if not self._catch_up(decoder) or self.prev is None:
            return Draft([])
        head_cache, tail_cache = decoder.caches
        device = self.prev.device
        token, prev, seq = ids[-1], self.prev, list(ids)
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        try:
            for i in range(k):
                lengths = torch.tensor([n + i + 1])  # (1,) on the host, as the decoder keeps them
                h = self.head(torch.tensor([[token]], device=device), lengths, cache=head_cache)  # (1, 1, d)
                guess = self.bridge(h, prev, torch.tensor([[n + i]], device=device), self.cache)  # (1, 1, d)
                logits = self._logits(guess, lengths, tail_cache)  # (1, V)
                token, q = pick(scores(torch.tensor([seq], device=device), logits), generator)
                if q is not None:
                    probs.append(q)
                tokens.append(token)
                seq.append(token)
                prev = guess
        finally:  # the caches go back to the verified slots, whatever happened
            for cache, part in ((head_cache, self.head), (tail_cache, self.tail)):
                extra = cache.get_seq_length(part.start) - n
                if extra > 0:
                    crop_cache(cache, extra)
            crop_cache(self.cache, self.cache.get_seq_length(0) - self.real)
        return Draft(tokens, torch.stack(probs) if probs else None)
