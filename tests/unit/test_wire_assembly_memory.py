"""Issue 14: an assembler holds only the bytes that arrived, frees them at once, and lets a budget refuse them."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import pytest
import torch

from fedsea.errors import IdleTimeoutError, InvalidInputError, LimitExceededError
from fedsea.limits import ServerLimits
from fedsea.server.budget import InflightBudget, gapped
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.adapters import StateAssembler
from fedsea.wire.receive import receive_tensor
from fedsea.wire.tensors import TensorAssembler, decode, encode

GIB = 1024**3


def declared(shape: tuple[int, ...], data: bytes, offset: int = 0) -> pb.TensorChunk:
    total = 4 * int(torch.Size(shape).numel())
    return pb.TensorChunk(dtype=pb.FLOAT32, shape=list(shape), offset=offset, total_bytes=total, data=data)


def test_a_declared_512_mib_tensor_holds_only_what_arrived():
    assembler = TensorAssembler("hidden", GIB)
    assembler.add(declared((128 * 1024 * 1024,), b"\1" * 1024))
    assert assembler.held_bytes == 1024 and not assembler.complete
    assembler.add(declared((128 * 1024 * 1024,), b"\2" * 4096, offset=1024))
    assert assembler.held_bytes == 5120
    assembler.release()
    assert assembler.held_bytes == 0
    with pytest.raises(InvalidInputError, match="released"):
        assembler.add(declared((128 * 1024 * 1024,), b"\3", offset=5120))


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 0, 3), (1,)])
def test_tensors_round_trip_from_grown_buffers(shape):
    tensor = torch.randn(shape)
    assert torch.equal(decode(encode(tensor, pb.FLOAT32, chunk_bytes=24), "t", GIB), tensor)
    half = tensor.to(torch.bfloat16)
    assert torch.equal(decode(encode(half, pb.BFLOAT16, chunk_bytes=10), "t", GIB), half)


def test_a_charge_that_refuses_keeps_nothing():
    seen: list[int] = []

    def charge(count: int) -> None:
        if sum(seen) + count > 100:
            raise LimitExceededError("over budget")
        seen.append(count)

    assembler = TensorAssembler("hidden", GIB, charge=charge)
    assembler.add(declared((64,), b"\0" * 64))
    with pytest.raises(LimitExceededError):
        assembler.add(declared((64,), b"\0" * 64, offset=64))
    assert assembler.held_bytes == 64 and seen == [64]


def test_a_state_is_bounded_in_all_as_it_arrives():
    state = StateAssembler("adapter", max_bytes=GIB, max_total_bytes=1000)
    state.add(pb.NamedTensorChunk(name="a", tensor=declared((200,), b"\0" * 600)))
    with pytest.raises(LimitExceededError, match="1000 bytes"):
        state.add(pb.NamedTensorChunk(name="b", tensor=declared((200,), b"\0" * 600)))
    assert state.held_bytes == 600
    state.release()
    assert state.held_bytes == 0


def test_a_failed_stream_frees_its_buffer_without_a_garbage_collection():
    seen: list[TensorAssembler] = []

    async def requests() -> AsyncIterator[pb.ForwardRequest]:
        yield pb.ForwardRequest(session_id="s", hidden=declared((1024, 1024), b"\0" * 65536))
        raise ConnectionError("the client went away")

    gc.disable()
    try:
        with pytest.raises(ConnectionError):
            asyncio.run(receive_tensor(requests(), "hidden", GIB, lambda m, c: pb.FLOAT32, track=seen.append))
        assert seen[0].held_bytes == 0  # released on the way out, not when the traceback is collected
    finally:
        gc.enable()


def test_a_budget_counts_per_client_and_refunds_on_exit():
    budget = InflightBudget(ServerLimits(max_inflight_bytes_per_client=100, max_inflight_bytes=150))
    with budget.stream("a") as first, budget.stream("b") as second:
        first(60)
        with pytest.raises(LimitExceededError, match="max_inflight_bytes_per_client=100"):
            first(41)
        second(80)
        with pytest.raises(LimitExceededError, match="max_inflight_bytes=150"):
            second(20)
        assert budget.held("a") == 60 and budget.held() == 140
    assert budget.held() == 0 and budget.streams() == 0


def test_a_closed_session_frees_its_streams_at_once():
    budget = InflightBudget(ServerLimits())
    with budget.stream("a") as ticket:
        ticket.bind(pb.ForwardRequest(session_id="s1"))
        assembler = TensorAssembler("hidden", GIB, charge=ticket)
        ticket.track(assembler)
        assembler.add(declared((1024,), b"\0" * 1000))
        budget.session_closed("a", "s1")
        assert assembler.held_bytes == 0 and budget.held() == 0
        with pytest.raises(KeyError, match="closed"):  # SessionNotFoundError: NOT_FOUND
            assembler.add(declared((1024,), b"\0" * 10, offset=1000))


def test_a_stalled_stream_passes_its_deadline():
    async def stalled() -> AsyncIterator[int]:
        yield 1
        await asyncio.sleep(30)
        yield 2

    async def read() -> list[int]:
        return [x async for x in gapped(stalled(), ServerLimits(stream_timeout_s=0.05), "Forward")]

    with pytest.raises(IdleTimeoutError, match="stream_timeout_s"):
        asyncio.run(read())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_a_pinned_assembly_is_copied_once_into_pinned_memory():
    tensor = torch.randn(4, 8, 16)
    assembler = TensorAssembler("hidden", GIB, pb.FLOAT32, pin_memory=True)
    for chunk in encode(tensor, pb.FLOAT32, chunk_bytes=100):
        assembler.add(chunk)
    out = assembler.tensor()
    assert out.is_pinned() and torch.equal(out, tensor) and torch.equal(assembler.tensor(), tensor)
