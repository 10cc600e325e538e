"""In-flight request memory: a budget of the tensor bytes that partial request streams hold.

A request stream that carries a tensor or an adapter (Forward, Backward, PutTrunkAdapter,
SubmitUpdate, a Generate step) holds the bytes that arrived until its call is answered. Each
such stream takes a ``StreamTicket``: every chunk is charged to it as it arrives, against a
budget per client and one for the server (RESOURCE_EXHAUSTED past either), and refunded when
the call ends, however it ends. The ticket also frees the stream's buffers at once when its
session closes (by the client, or reaped idle), so nothing waits for the stream to notice or
for a garbage collection. ``gapped`` bounds the wait for each next message (``stream_timeout_s``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import torch

from fedsea.errors import IdleTimeoutError, LimitExceededError, SessionNotFoundError
from fedsea.limits import ServerLimits
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.adapters import receive_state
from fedsea.wire.receive import receive_tensor

M = TypeVar("M")


class Releasable(Protocol):
    """An assembler whose buffers can be freed at once (``TensorAssembler``, ``StateAssembler``)."""

    def release(self) -> None:
        """Free the buffers now; later chunks are refused."""


class StreamTicket:
    """One request stream's share of the in-flight budget; made by ``InflightBudget.stream``."""

    def __init__(self, budget: InflightBudget, client: str) -> None:
        self.budget = budget
        self.client = client
        self.session_id: str | None = None
        self.held = 0
        self.cancelled: str | None = None  # why the stream's buffers were freed from outside
        self._assemblers: list[Releasable] = []

    def __call__(self, count: int) -> None:
        """Charge ``count`` bytes that just arrived (the assemblers' ``charge``)."""
        self.budget.charge(self, count)

    def bind(self, message: M) -> M:
        """Note the session of the stream's first ``message`` (so closing it frees the stream); returns it."""
        self.session_id = str(getattr(message, "session_id", "")) or None
        return message

    def track(self, assembler: Releasable) -> None:
        """Free ``assembler``'s buffers when the session closes under the stream."""
        self._assemblers.append(assembler)

    def forget(self) -> None:
        """Stop tracking the assemblers seen so far (their tensors were used)."""
        self._assemblers.clear()

    def cancel(self, reason: str) -> None:
        """Free the stream's buffers now; its next chunk is refused with ``reason`` (NOT_FOUND)."""
        self.cancelled = reason
        for assembler in self._assemblers:
            assembler.release()


class InflightBudget:
    """Tensor bytes held by partial request streams, per client and in all.

    Args:
        limits: ``max_inflight_bytes_per_client`` and ``max_inflight_bytes``.
    """

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()  # sessions close on the compute or reaper thread
        self._tickets: set[StreamTicket] = set()
        self._by_client: dict[str, int] = {}
        self._total = 0

    @contextmanager
    def stream(self, client: str) -> Iterator[StreamTicket]:
        """A ticket for one request stream of ``client``, refunded and its buffers freed on exit."""
        ticket = self.open(client)
        try:
            yield ticket
        finally:
            self.close(ticket)

    def open(self, client: str) -> StreamTicket:
        """A ticket for one request stream of ``client``; ``close`` it however the call ends."""
        ticket = StreamTicket(self, client)
        with self._lock:
            self._tickets.add(ticket)
        return ticket

    def close(self, ticket: StreamTicket) -> None:
        """Free the ticket's buffers (tensors already made from them keep theirs) and refund its bytes."""
        ticket.cancel("the call ended")
        with self._lock:
            self._tickets.discard(ticket)
            self._refund(ticket)

    def settle(self, ticket: StreamTicket) -> None:
        """Refund what the ticket holds now (a Generate step was computed); the stream goes on."""
        with self._lock:
            self._refund(ticket)
            ticket.forget()

    def charge(self, ticket: StreamTicket, count: int) -> None:
        """Count ``count`` more bytes for ``ticket``; refuse them past a budget (RESOURCE_EXHAUSTED)."""
        with self._lock:
            if ticket.cancelled is not None:
                raise SessionNotFoundError(ticket.cancelled)
            mine = self._by_client.get(ticket.client, 0) + count
            if mine > self.limits.max_inflight_bytes_per_client:
                raise LimitExceededError(
                    f"this client's request streams hold more than max_inflight_bytes_per_client="
                    f"{self.limits.max_inflight_bytes_per_client} bytes; finish or cancel one first"
                )
            if self._total + count > self.limits.max_inflight_bytes:
                raise LimitExceededError(
                    f"the server's request streams hold more than max_inflight_bytes="
                    f"{self.limits.max_inflight_bytes} bytes; retry later"
                )
            self._by_client[ticket.client] = mine
            self._total += count
            ticket.held += count

    def _refund(self, ticket: StreamTicket) -> None:
        left = self._by_client.get(ticket.client, 0) - ticket.held
        if left > 0:
            self._by_client[ticket.client] = left
        else:
            self._by_client.pop(ticket.client, None)
        self._total -= ticket.held
        ticket.held = 0

    def session_closed(self, client: str, session_id: str) -> None:
        """Free the buffers of every stream of a session that closed (by its client or idle)."""
        with self._lock:
            tickets = [t for t in self._tickets if t.client == client and t.session_id == session_id]
        for ticket in tickets:
            ticket.cancel(f"session {session_id[:64]!r} was closed while the request was arriving")
            with self._lock:
                self._refund(ticket)  # its bytes are freed now

    def held(self, client: str | None = None) -> int:
        """Bytes charged now, of one client or in all."""
        with self._lock:
            return self._total if client is None else self._by_client.get(client, 0)

    def streams(self) -> int:
        """Request streams holding a ticket now."""
        with self._lock:
            return len(self._tickets)


class Gapped(AsyncIterator[M]):
    """``requests`` with a deadline on each next message: ``IdleTimeoutError`` (DEADLINE_EXCEEDED) past it.

    A class, not an async generator: a generator's suspended frame would keep the stream's
    locals (and their buffers) alive until it is collected.
    """

    def __init__(self, requests: AsyncIterable[M], timeout_s: float, what: str) -> None:
        self._requests = requests.__aiter__()
        self.timeout_s = timeout_s
        self.what = what

    def __aiter__(self) -> Gapped[M]:
        return self

    async def __anext__(self) -> M:
        try:
            async with asyncio.timeout(self.timeout_s):  # a timer, not a task per message (as wait_for makes)
                return await self._requests.__anext__()
        except TimeoutError:
            raise IdleTimeoutError(
                f"{self.what}: no message for {self.timeout_s:g} s (stream_timeout_s); the request was dropped"
            ) from None


def gapped(requests: AsyncIterable[Any], limits: ServerLimits, what: str) -> Gapped[Any]:
    """``requests`` with ``limits.stream_timeout_s`` as the longest wait for each message."""
    return Gapped(requests, limits.stream_timeout_s, what)


async def receive_budgeted_tensor(
    requests: AsyncIterable[M],
    field: str,
    limits: ServerLimits,
    ticket: StreamTicket,
    on_first: Callable[[M, pb.TensorChunk], int],
    pin_memory: bool = False,
) -> tuple[M, torch.Tensor, int, int]:
    """``receive_tensor`` of a step stream (Forward, Backward): each message within
    ``stream_timeout_s``, its bytes charged to ``ticket`` (which frees them if the session closes)."""
    return await receive_tensor(
        gapped(requests, limits, field),
        field,
        limits.max_tensor_bytes,
        lambda message, chunk: on_first(ticket.bind(message), chunk),
        pin_memory=pin_memory,
        allow_compression=True,
        charge=ticket,
        track=ticket.track,
    )


async def receive_budgeted_state(
    requests: AsyncIterable[M],
    field: str,
    limits: ServerLimits,
    ticket: StreamTicket,
    named: Callable[[M], pb.NamedTensorChunk | None],
    on_first: Callable[[M], object] | None = None,
) -> tuple[M, dict[str, torch.Tensor], int]:
    """``receive_state`` of an adapter stream (PutTrunkAdapter, SubmitUpdate): each message within
    ``stream_timeout_s``, at most ``max_adapter_bytes`` in all, charged to ``ticket`` as they arrive."""

    def first(message: M) -> object:
        ticket.bind(message)
        return on_first(message) if on_first is not None else None

    return await receive_state(
        gapped(requests, limits, field),
        field,
        limits.max_tensor_bytes,
        named=named,
        on_first=first,
        max_total_bytes=limits.max_adapter_bytes,
        charge=ticket,
        track=ticket.track,
    )
