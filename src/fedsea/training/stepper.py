"""The trunk's side of a generation, behind one protocol: ``LocalStepper`` runs it in process.

A ``TrunkStepper`` hides where the trunk is: the generation loop (``fedsea.training.generation``)
hands it the head's output and gets the trunk's back, whether the trunk is a module here
(``LocalStepper``) or a server at the other end of a gRPC stream (``fedsea.client``'s
``RemoteStepper``). Both keep the trunk's KV cache between steps and can ``rewind`` it to a
shorter length, which is what speculative decoding needs to drop rejected draft tokens.

``rewind_cache`` is the one rule for a rewind, shared by this process's caches and the
server's, so that a bad length is refused the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache

from fedsea.errors import InvalidInputError
from fedsea.model.cache import crop_cache
from fedsea.model.split import Trunk

# One int32 length per sequence travels with each hidden-state message.
LENGTH_BYTES = 4
# The field a bad rewind is refused on (the wire's ``GenerateRewind.length``).
REWIND_FIELD = "rewind.length"


@dataclass
class CutTraffic:
    """Bytes that crossed each cut: head -> trunk (client to server) and trunk -> tail (back)."""

    head_to_trunk: int = 0
    trunk_to_tail: int = 0
    messages: int = 0
    per_step: list[int] = field(default_factory=list)

    def record(self, up: torch.Tensor, down: torch.Tensor, lengths: torch.Tensor) -> None:
        """Count one step: ``up`` (B, n, d) to the trunk with ``lengths`` (B,), ``down`` (B, n, d) back."""
        up_bytes = up.numel() * up.element_size() + lengths.numel() * LENGTH_BYTES
        down_bytes = down.numel() * down.element_size()
        self.head_to_trunk += up_bytes
        self.trunk_to_tail += down_bytes
        self.messages += 2
        self.per_step.append(up_bytes + down_bytes)


class TrunkStepper(Protocol):
    """The trunk's side of one generation: keeps its own KV cache between steps."""

    def step(
        self, step: int, hidden: torch.Tensor, lengths: torch.Tensor | None, keep_rows: list[int] | None
    ) -> torch.Tensor:
        """Trunk output for ``hidden`` (B, n, d). ``lengths`` (B,) only at the prefill (and naive steps);
        ``keep_rows`` (when rows finished) selects the cached rows that go on, before this step."""
        ...

    def rewind(self, length: int) -> None:
        """Truncate the trunk's KV cache to its first ``length`` slots (prompt padding included)."""
        ...

    def close(self) -> None:
        """Free the trunk's cache; the stepper is not used again."""
        ...


def rewind_cache(
    cache: DynamicCache | None, first_layer: int, lengths: torch.Tensor | None, length: int
) -> torch.Tensor:
    """Crop ``cache`` to ``length`` slots and return the rows' real lengths (B,) after the cut.

    ``first_layer`` is the first block the cache holds (a part's cache is indexed by global
    block number). Every row keeps at least one real token, or its attention would see nothing;
    anything else is an ``InvalidInputError`` on ``rewind.length``.
    """
    if cache is None or lengths is None:
        raise InvalidInputError(REWIND_FIELD, "nothing to rewind: no KV cache (before the prefill, or a naive stream)")
    cached = cache.get_seq_length(first_layer)
    cut = cached - length
    if length < 1 or cut < 0:
        raise InvalidInputError(REWIND_FIELD, f"must be in [1, {cached}] (the cached slots), got {length}")
    shortest = int(lengths.min())
    if shortest - cut < 1:
        raise InvalidInputError(
            REWIND_FIELD, f"must be >= {cached - shortest + 1}: {length} would cut a whole sequence of the batch"
        )
    if cut:
        crop_cache(cache, cut)  # sliding-window layers too (they record their whole past)
    return lengths - cut


class LocalStepper:
    """The trunk in this process (task evaluation, tests, the centralized comparison).

    Args:
        trunk: the server's part, here.
        use_cache: keep a KV cache; False is the naive baseline (everything resent every step).
        traffic: if given, counts the bytes that would cross each cut over a wire.
    """

    def __init__(self, trunk: Trunk, use_cache: bool = True, traffic: CutTraffic | None = None) -> None:
        self.trunk = trunk.eval()
        self.cache: DynamicCache | None = trunk.new_cache() if use_cache else None
        self.lengths: torch.Tensor | None = None  # (B,) real tokens so far, past included
        self.traffic = traffic

    @torch.no_grad()
    def step(
        self, step: int, hidden: torch.Tensor, lengths: torch.Tensor | None, keep_rows: list[int] | None
    ) -> torch.Tensor:
        """Trunk output (B, n, d) for ``hidden`` (B, n, d), against the cache."""
        if keep_rows is not None:
            index = torch.tensor(keep_rows, dtype=torch.int64, device=hidden.device)
            if self.cache is not None:
                self.cache.batch_select_indices(index)
            assert self.lengths is not None
            self.lengths = self.lengths[index]
        if lengths is not None:
            self.lengths = lengths
        else:
            assert self.lengths is not None
            self.lengths = self.lengths + hidden.shape[1]  # n new slots per row
        out: torch.Tensor = self.trunk(hidden, self.lengths, cache=self.cache)  # (B, n, d)
        if self.traffic is not None:
            self.traffic.record(hidden, out, self.lengths)
        return out

    def rewind(self, length: int) -> None:
        """Truncate the trunk's cache to ``length`` slots (see ``rewind_cache``)."""
        self.lengths = rewind_cache(self.cache, self.trunk.start, self.lengths, length)

    def close(self) -> None:
        """Drop the cache."""
        self.cache = None
