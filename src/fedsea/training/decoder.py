"""``SplitDecoder``: head, trunk (behind a stepper) and tail run on fed tokens, each with its KV cache.

The client's half of split generation: the head's and the tail's caches live here, the
trunk's in the stepper (in process or on a server). The generation loop
(``fedsea.training.generation``) drives it token by token; speculative decoding would drive
it k tokens at a time and ``rewind`` the rejected ones. The noise on h_p (``privatize``) is
applied here, to every hidden state before it reaches the trunk, at inference as in training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache

from fedsea.model.split import SplitModel
from fedsea.training.shared_parts import joint_parts
from fedsea.training.stepper import TrunkStepper, rewind_cache


class SplitDecoder:
    """Feeds tokens through head, trunk and tail; keeps the ids, lengths and caches of the running rows.

    Args:
        split: the client's head and tail (its trunk is not used: the stepper is the trunk).
        stepper: the trunk's side.
        input_ids: (B, n) left-padded prompts; lengths: (B,) their real lengths.
        use_cache: KV caches on every part; False is the naive baseline (every step recomputes
            and resends the whole sequence).
        privatize: clipping and noise applied to the head's output before it goes to the trunk.
    """

    def __init__(
        self,
        split: SplitModel,
        stepper: TrunkStepper,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        use_cache: bool = True,
        privatize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.head, self.tail = split.head.eval(), split.tail.eval()
        self.stepper = stepper
        self.use_cache = use_cache
        self.privatize = privatize
        self.caches: tuple[DynamicCache, DynamicCache] | None = (
            (self.head.new_cache(), self.tail.new_cache()) if use_cache else None
        )
        self.ids = input_ids  # (B_run, T): every token fed (prompt included), pending ones too
        # (B_run,) real tokens of each row in ``ids``, kept on the host: checks and masks built
        # from it then cost no device sync (the parts copy it over without waiting).
        self.lengths = lengths.to(device="cpu", dtype=torch.int64)
        self.steps = 0  # stepper messages so far (the wire's step number)
        self._pending: torch.Tensor | None = input_ids  # (B, k) tokens not yet through the parts
        self._keep: list[int] | None = None  # rows to keep, told to the stepper with the next step
        # The last step's clean head output h_p and the trunk's output, each (B, k, d), for the
        # slots still in the caches (a rewind trims them): the bridge drafter learns from them.
        self.states: tuple[torch.Tensor, torch.Tensor] | None = None
        # Shared with the other decoders of ``split`` running at the same time (other threads):
        # their head and tail calls join into one pass (``fedsea.training.shared_parts``). Opened
        # last (nothing after it can fail) and only with caches: a naive decoder calls its parts itself.
        self.parts = joint_parts(split)
        self._token = self.parts.open(self) if use_cache else None

    @property
    def length(self) -> int:
        """Slots of every part's cache (padding included) once the pending tokens are fed."""
        return int(self.ids.shape[1])

    def feed(self, tokens: torch.Tensor) -> None:
        """Append ``tokens`` (B_run, k) to every running row; they go through the parts at ``logits``."""
        if self._pending is not None:
            raise RuntimeError("feed: the previous tokens have not been run yet (call logits first)")
        self.ids = torch.cat([self.ids, tokens], dim=1)
        self.lengths = self.lengths + tokens.shape[1]
        self._pending = tokens

    @torch.no_grad()
    def logits(self, keep: int = 1) -> torch.Tensor:
        """Run the pending tokens through the three parts; (B_run, keep, V) logits of the last slots."""
        if self._pending is None:
            raise RuntimeError("logits: nothing fed since the last call")
        prefill = self.steps == 0
        logits: torch.Tensor  # (B, keep, V)
        if self.caches is not None:
            clean = self.parts.run_head(self._pending, self.lengths, self.caches[0], self._token)  # (B, k|n, d)
            h = self.privatize(clean) if self.privatize is not None else clean
            t = self.stepper.step(self.steps, h, self.lengths if prefill else None, self._keep)
            self.states = (clean, t)
            logits = self.parts.run_tail(t, self.lengths, self.caches[1], keep, self._token)  # (B, keep, V)
        else:
            h = self.head(self.ids, self.lengths)  # (B, T, d): everything, every time
            h = self.privatize(h) if self.privatize is not None else h
            t = self.stepper.step(self.steps, h, self.lengths, self._keep)
            logits = self.tail(t, self.lengths, logits_to_keep=keep)
        self.steps += 1
        self._pending, self._keep = None, None
        return logits

    def close(self) -> None:
        """The generation is over: the other decoders' passes no longer wait for this one."""
        if self._token is not None:
            self.parts.close(self._token)
            self._token = None

    def keep_rows(self, rows: list[int]) -> None:
        """Go on with ``rows`` only (indices into the running rows, increasing); the rest are dropped."""
        if self._pending is not None:
            raise RuntimeError("keep_rows: fed tokens are pending (call logits first)")
        host_index = torch.tensor(rows, dtype=torch.int64)  # (B_keep,)
        index = host_index.to(self.ids.device, non_blocking=True)
        if self.caches is not None:
            for cache in self.caches:
                cache.batch_select_indices(index)
        self.ids, self.lengths = self.ids[index], self.lengths[host_index]
        self.states = None
        if self._keep is not None:  # two selections before one step compose
            rows = [self._keep[r] for r in rows]
        self._keep = rows

    def rewind(self, length: int) -> None:
        """Truncate every part's cache (and the ids) to their first ``length`` slots.

        The stepper is rewound too (on a server: one message, no round trip). Tokens fed after a
        rewind continue from slot ``length``, exactly as if those after it had never been fed.
        """
        if self._pending is not None:
            raise RuntimeError("rewind: fed tokens are pending (call logits first)")
        if self._keep is not None:  # the stepper would check the rewind against rows already dropped here
            raise RuntimeError("rewind: rows were dropped since the last step (rewind first, then drop)")
        # A naive decoder has no cache: refused by the same rule as a naive stepper.
        head_cache, tail_cache = self.caches if self.caches is not None else (None, None)
        cut = self.length - length
        lengths = rewind_cache(head_cache, self.head.start, self.lengths, length)
        assert tail_cache is not None  # a head cache implies a tail cache
        rewind_cache(tail_cache, self.tail.start, self.lengths, length)
        self.stepper.rewind(length)
        self.ids, self.lengths = self.ids[:, : self.ids.shape[1] - cut], lengths
        if self.states is not None:  # keep the states of the slots still cached
            kept = self.states[0].shape[1] - cut
            self.states = (self.states[0][:, :kept], self.states[1][:, :kept]) if kept > 0 else None
