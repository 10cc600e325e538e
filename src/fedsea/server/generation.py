"""Inference streams on the trunk: the server's half of KV-cache collaboration.

A stream belongs to one of the client's training sessions and uses its trunk adapter and
partition points. At the prefill the server admits the stream against the cache budget by
reserving its worst case (rows x max_length x bytes per token); a request that would exceed
the budget is refused with RESOURCE_EXHAUSTED instead of risking an out-of-memory crash.
Fair share: a client holds at most ``max_generation_sessions_per_client`` streams and
``max_cache_bytes_per_client`` of the budget, so that one client cannot lock the others out;
a session that closes (or is reaped idle) closes its streams and frees their caches at once.
Each decode step then runs the trunk on one hidden vector per row against the cached keys
and values. Finished rows can be dropped (``keep_rows``) so they stop costing work, and the
cache can be rewound to a shorter length (``rewind``, by the same rule as the client's caches).
"""

from __future__ import annotations

import itertools
import secrets
import threading
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from fedsea.errors import InvalidInputError, LimitExceededError, ProtocolError
from fedsea.model.device import to_host
from fedsea.model.masks import check_finite
from fedsea.server.trunk import Session, TrunkHost
from fedsea.training.stepper import rewind_cache


@dataclass
class GenStream:
    """One open inference stream."""

    id: str
    owner: str
    session: Session
    max_length: int
    naive: bool
    step: int = 0
    batch: int = 0
    reserved: int = 0  # bytes of the cache budget held for this stream
    cache: DynamicCache | None = None
    lengths: torch.Tensor | None = None  # (B,) real tokens so far, past included
    closed: bool = field(default=False)

    def cache_bytes(self) -> int:
        """Bytes the stream's trunk KV cache holds now."""
        if self.cache is None:
            return 0
        total = 0
        for layer in self.cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


class GenerationHost:
    """Open, step and close inference streams over a ``TrunkHost``'s sessions."""

    def __init__(self, host: TrunkHost) -> None:
        self.host = host
        self.limits = host.limits
        self._streams: dict[str, GenStream] = {}
        self._lock = threading.Lock()  # the stream table and the budget
        cfg = host.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._kv_per_layer_token: int = 2 * cfg.num_key_value_heads * head_dim * host.model.dtype.itemsize
        host.on_drop.append(self._session_closed)

    def bytes_per_row_token(self, stream: GenStream) -> int:
        """Cache bytes one row adds per token: 2 (K, V) x kv heads x head dim x dtype x trunk blocks."""
        trunk = stream.session.trunk
        return self._kv_per_layer_token * (trunk.end - trunk.start)

    # -- lifecycle -------------------------------------------------------------------------
    def open(self, owner: str, session_id: str, max_length: int, naive: bool) -> GenStream:
        """Open an inference stream on a session, within the stream and memory limits."""
        session = self.host.get(owner, session_id)
        if max_length < 1:
            raise InvalidInputError("max_length", f"must be >= 1, got {max_length}")
        if max_length > self.limits.max_seq_len:
            raise LimitExceededError(
                f"max_length {max_length} exceeds the server's max_seq_len={self.limits.max_seq_len}"
            )
        with self._lock:
            mine = sum(1 for s in self._streams.values() if s.owner == owner)
            if mine >= self.limits.max_generation_sessions_per_client:
                raise LimitExceededError(
                    f"this client has {mine} open inference streams (max_generation_sessions_per_client="
                    f"{self.limits.max_generation_sessions_per_client}); close one first"
                )
            if len(self._streams) >= self.limits.max_generation_sessions:
                raise LimitExceededError(
                    f"the server has {len(self._streams)} open inference streams "
                    f"(max_generation_sessions={self.limits.max_generation_sessions}); try again later"
                )
            stream = GenStream(secrets.token_urlsafe(12), owner, session, max_length, naive)
            self._streams[stream.id] = stream
        return stream

    def close(self, stream: GenStream) -> None:
        """Free the stream's cache and give its reservation back (idempotent)."""
        with self._lock:
            stream.closed = True
            stream.cache = None
            stream.lengths = None
            stream.reserved = 0
            self._streams.pop(stream.id, None)

    def _session_closed(self, session: Session) -> None:
        """Close the streams of a session that closed (by its client or idle): their caches go now."""
        with self._lock:
            streams = [s for s in self._streams.values() if s.session is session]
        for stream in streams:
            self.close(stream)

    def _reserve(self, stream: GenStream, rows: int) -> None:
        need = rows * stream.max_length * self.bytes_per_row_token(stream)
        with self._lock:
            mine = sum(s.reserved for s in self._streams.values() if s is not stream and s.owner == stream.owner)
            if mine + need > self.limits.max_cache_bytes_per_client:
                raise LimitExceededError(
                    f"this client's KV-cache budget is exhausted: this stream needs {need:,} bytes ({rows} rows x "
                    f"{stream.max_length} tokens), its other streams hold {mine:,} of max_cache_bytes_per_client="
                    f"{self.limits.max_cache_bytes_per_client:,}; close a stream or ask for a shorter max_length"
                )
            others = sum(s.reserved for s in self._streams.values() if s is not stream)
            if others + need > self.limits.max_cache_bytes:
                raise LimitExceededError(
                    f"KV-cache budget exhausted: this stream needs {need:,} bytes ({rows} rows x "
                    f"{stream.max_length} tokens), {others:,} of {self.limits.max_cache_bytes:,} are in use; "
                    "retry later or ask for a shorter max_length"
                )
            stream.reserved = need

    # -- steps -----------------------------------------------------------------------------------
    def step(
        self,
        stream: GenStream,
        step: int,
        hidden: torch.Tensor,
        lengths: list[int],
        keep_rows: list[int],
    ) -> torch.Tensor:
        """Run the trunk for one step of ``stream``; returns (B, n, d) hidden states."""
        lens = self.prepare(stream, step, hidden, lengths, keep_rows)
        out = self.compute(stream, hidden, lens)
        self.finish(stream, lens)
        return out

    def prepare(
        self,
        stream: GenStream,
        step: int,
        hidden: torch.Tensor,
        lengths: list[int],
        keep_rows: list[int],
    ) -> torch.Tensor:
        """Check a step of ``stream`` and apply its ``keep_rows`` (and, at the prefill, its admission and
        new cache); returns the rows' lengths (B,) after it, for the trunk. ``finish`` records them once computed."""
        if stream.closed:
            raise ProtocolError("the inference stream is closed (or its session was)")
        if step != stream.step:
            raise ProtocolError(f"generation step {step}, but the stream expects step {stream.step}")
        self.host.check_hidden_shape(tuple(hidden.shape))
        batch, new = hidden.shape[0], hidden.shape[1]
        if keep_rows:
            self._keep(stream, keep_rows)
        if stream.naive or step == 0:
            if step > 0 and batch != stream.batch:
                raise InvalidInputError("hidden", f"expected {stream.batch} rows, got {batch}")
            if len(lengths) != batch:
                raise InvalidInputError("lengths", f"expected {batch} lengths, got {len(lengths)}")
            if new > stream.max_length:
                raise LimitExceededError(f"hidden: {new} tokens exceed the stream's max_length={stream.max_length}")
            lens = torch.tensor(lengths, dtype=torch.int64)
            if step == 0:
                self._reserve(stream, batch)
                stream.batch = batch
                stream.cache = None if stream.naive else stream.session.trunk.new_cache()
        else:
            if lengths:
                raise InvalidInputError("lengths", "only the prefill carries lengths")
            # One vector per row, or k + 1 at once (speculative decoding's verification step).
            if new < 1 or batch != stream.batch:
                raise InvalidInputError(
                    "hidden",
                    f"a decode step carries vectors for every row: expected ({stream.batch}, n >= 1, d), "
                    f"got {tuple(hidden.shape)}",
                )
            assert stream.lengths is not None
            lens = stream.lengths + new
            if int(lens.max()) > stream.max_length or self._cached_len(stream) + new > stream.max_length:
                raise LimitExceededError(f"the stream reached its max_length={stream.max_length}")
        return lens

    def finish(self, stream: GenStream, lengths: torch.Tensor) -> None:
        """Record a computed step: the rows' lengths (B,) now, the next step's number."""
        stream.lengths = lengths
        stream.step += 1

    def _cached_len(self, stream: GenStream) -> int:
        return stream.cache.get_seq_length(stream.session.trunk.start) if stream.cache is not None else 0

    def _keep(self, stream: GenStream, rows: list[int]) -> None:
        if stream.step == 0 or (stream.naive and stream.lengths is None):
            raise InvalidInputError("keep_rows", "nothing to keep before the prefill")
        if any(b <= a for a, b in itertools.pairwise(rows)) or rows[0] < 0 or rows[-1] >= stream.batch:
            raise InvalidInputError("keep_rows", f"must be increasing row numbers below {stream.batch}, got {rows}")
        index = torch.tensor(rows, dtype=torch.int64)
        with self.host.computing():
            if stream.cache is not None:
                stream.cache.batch_select_indices(index)
            assert stream.lengths is not None
            stream.lengths = stream.lengths[index]
            stream.batch = len(rows)
        with self._lock:
            stream.reserved = len(rows) * stream.max_length * self.bytes_per_row_token(stream)

    def rewind(self, stream: GenStream, length: int) -> None:
        """Truncate the stream's trunk cache to ``length`` slots; the rows' lengths follow.

        The reservation stays: it is the worst case of ``max_length``, which a rewind does not change.
        """
        if stream.closed:
            raise ProtocolError("the inference stream is closed (or its session was)")
        with self.host.computing():  # the cache may be in use by a batched step
            # No cache (before the prefill, or a naive stream) is refused like a bad length.
            stream.lengths = rewind_cache(stream.cache, stream.session.trunk.start, stream.lengths, length)

    def compute(self, stream: GenStream, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The trunk on one prepared step of ``stream`` alone, its session's adapter active; (B, n, d) on the host."""
        host = self.host
        with host.computing(), torch.no_grad():
            session = host.get(stream.owner, stream.session.id)  # NOT_FOUND if it was closed meanwhile
            with host.computing(session, training=False):
                # Checked on the host, where the wire put it: on the device the check would sync.
                check_finite(hidden, "hidden")
                out: torch.Tensor = session.trunk(
                    hidden.to(device=host.model.device, dtype=host.model.dtype), lengths, cache=stream.cache
                )  # (B, n, d)
                return to_host(out)

    # -- metrics ---------------------------------------------------------------------------------
    def count(self, owner: str | None = None) -> int:
        """Open streams, of one owner or in all."""
        with self._lock:
            return sum(1 for s in self._streams.values() if owner is None or s.owner == owner)

    def cache_bytes(self, owner: str | None = None) -> int:
        """KV-cache bytes held by open streams, of one owner or in all."""
        with self._lock:
            streams = [s for s in self._streams.values() if owner is None or s.owner == owner]
        return sum(s.cache_bytes() for s in streams)

    def reserved_bytes(self) -> int:
        """Cache bytes reserved by admission control for the streams' full lengths."""
        with self._lock:
            return sum(s.reserved for s in self._streams.values())
