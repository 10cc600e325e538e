"""Adapter-state streams: a state (name -> tensor) <-> chunked ``NamedTensorChunk`` messages.

Four RPCs carry a LoRA state: ``PutTrunkAdapter`` and ``SubmitUpdate`` up, ``GetTrunkAdapter``
and ``AwaitRound`` down. Each tensor travels as float32, names in sorted order, in chunks of
at most ``chunk_bytes`` bytes; this module builds and reassembles all four, and sizes chunks
under a message limit (``chunk_bytes_under``).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from typing import TypeVar

import torch

from fedsea.errors import InvalidInputError, LimitExceededError
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.tensors import DEFAULT_CHUNK_BYTES, TensorAssembler, encode

M = TypeVar("M")
# Room under the message limit for everything in a chunk message but its tensor bytes.
FRAME_HEADROOM = 64 * 1024
# Most tensors one state may hold (a 70B model's LoRA has ~1,100): refuses a flood of names.
MAX_TENSORS = 100_000
# A client trusts its server's sizes.
UNLIMITED = 1 << 40


def chunk_bytes_under(max_message_bytes: int, cap: int | None = None) -> int:
    """Tensor bytes per chunk that leave ``FRAME_HEADROOM`` under a message limit (and stay <= ``cap``)."""
    room = max_message_bytes - FRAME_HEADROOM
    return max(1024, room if cap is None else min(cap, room))


def named_chunks(
    state: dict[str, torch.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES, session_id: str = ""
) -> Iterator[pb.NamedTensorChunk]:
    """A state's messages; ``session_id`` (if any) goes in the first one only."""
    first = True
    for name in sorted(state):
        for chunk in encode(state[name], pb.FLOAT32, chunk_bytes):
            yield pb.NamedTensorChunk(session_id=session_id if first else "", name=name, tensor=chunk)
            first = False


def round_messages(
    number: int, selected: bool, finished: bool, local_steps: int, state: dict[str, torch.Tensor], chunk_bytes: int
) -> Iterator[pb.RoundMessage]:
    """``AwaitRound``'s answer: the round's header, then the client's head and tail tensors."""
    yield pb.RoundMessage(round=number, selected=selected, finished=finished, local_steps=local_steps)
    for named in named_chunks(state, chunk_bytes):
        yield pb.RoundMessage(round=number, tensor=named)


def submit_messages(
    round_number: int, num_samples: int, loss: float, state: dict[str, torch.Tensor]
) -> Iterator[pb.SubmitChunk]:
    """``SubmitUpdate``'s request: the header (round, samples, mean loss), then the update's tensors."""
    yield pb.SubmitChunk(round=round_number, num_samples=num_samples, loss=loss)
    for named in named_chunks(state):
        yield pb.SubmitChunk(tensor=named)


class StateAssembler:
    """Rebuilds a state from its chunks, each tensor checked like any other (``TensorAssembler``).

    Memory follows bytes: each tensor's buffer grows with what arrived, and the state's bytes
    together are counted as they arrive against ``max_total_bytes`` (and told to ``charge``).

    Args:
        field: name in error messages; a tensor is ``field[name]``.
        max_bytes: largest tensor accepted.
        max_total_bytes: most bytes of all the state's tensors together (RESOURCE_EXHAUSTED past it).
        charge: called with each chunk's byte count before its bytes are kept; raises to refuse them.
    """

    def __init__(
        self,
        field: str,
        max_bytes: int = UNLIMITED,
        max_total_bytes: int = UNLIMITED,
        charge: Callable[[int], None] | None = None,
    ) -> None:
        self.field = field
        self.max_bytes = max_bytes
        self.max_total_bytes = max_total_bytes
        self._charge = charge
        self._total = 0
        self._released = False
        self._parts: dict[str, TensorAssembler] = {}

    def _count(self, count: int) -> None:
        if self._total + count > self.max_total_bytes:
            raise LimitExceededError(
                f"{self.field}: more than {self.max_total_bytes} bytes of tensors in one state (max_adapter_bytes)"
            )
        if self._charge is not None:
            self._charge(count)
        self._total += count

    def add(self, named: pb.NamedTensorChunk) -> None:
        """Take one chunk of the tensor ``named.name``."""
        if self._released:
            self._count(0)  # a budget that freed the buffers says why (its session closed)
            raise InvalidInputError(self.field, "the stream's buffers were released")
        part = self._parts.get(named.name)
        if part is None:
            if len(self._parts) >= MAX_TENSORS:
                raise InvalidInputError(self.field, "too many tensors")
            field = f"{self.field}[{named.name[:200]}]"  # an unbounded name is not echoed whole
            part = self._parts[named.name] = TensorAssembler(field, self.max_bytes, charge=self._count)
        part.add(named.tensor)

    @property
    def held_bytes(self) -> int:
        """Bytes of tensor data held now (what arrived; 0 once released)."""
        return sum(part.held_bytes for part in self._parts.values())

    def release(self) -> None:
        """Free every partial tensor now (a refused or abandoned stream); later chunks are refused."""
        self._released = True
        for part in self._parts.values():
            part.release()
        self._parts.clear()

    def state(self, check_finite: bool = True) -> dict[str, torch.Tensor]:
        """The float32 tensors by name; with ``check_finite``, NaN or Inf is refused."""
        state = {name: part.tensor().float() for name, part in self._parts.items()}
        for name, tensor in state.items() if check_finite else ():
            if not bool(torch.isfinite(tensor).all()):
                raise InvalidInputError(f"{self.field}[{name[:200]}]", "contains NaN or Inf")
        return state


def assemble_state(messages: Iterable[pb.NamedTensorChunk], field: str) -> dict[str, torch.Tensor]:
    """A state from a server's messages, as sent (a client trusts its server's sizes and values)."""
    assembler = StateAssembler(field)
    for named in messages:
        assembler.add(named)
    return assembler.state(check_finite=False)


async def receive_state(
    requests: AsyncIterable[M],
    field: str,
    max_bytes: int,
    *,
    named: Callable[[M], pb.NamedTensorChunk | None],
    on_first: Callable[[M], object] | None = None,
    max_total_bytes: int = UNLIMITED,
    charge: Callable[[int], None] | None = None,
    track: Callable[[StateAssembler], None] | None = None,
) -> tuple[M, dict[str, torch.Tensor], int]:
    """A client's state stream: (first message, checked float32 state, bytes received).

    ``named`` picks a message's chunk (None: it carries none, e.g. a header); ``on_first``
    sees the first message before any tensor is assembled (e.g. NOT_FOUND for its session).
    ``max_total_bytes`` and ``charge`` bound the state's bytes as they arrive (``StateAssembler``;
    ``track`` sees it, whose buffers a budget may free early, ``fedsea.server.budget``);
    on any error the partial tensors are freed before the error leaves.
    """
    first: M | None = None
    assembler = StateAssembler(field, max_bytes, max_total_bytes, charge)
    if track is not None:
        track(assembler)
    received = 0
    try:
        async for message in requests:
            received += message.ByteSize()  # type: ignore[attr-defined]
            if first is None:
                first = message
                if on_first is not None:
                    on_first(message)
            chunk = named(message)
            if chunk is not None:
                assembler.add(chunk)
        if first is None:
            raise InvalidInputError("request", "empty request stream")
        return first, assembler.state(), received
    finally:
        assembler.release()  # the state (if made) holds its tensors; the partial buffers go now
