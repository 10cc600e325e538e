"""Issue 14, memory: the server holds only bytes that arrived, frees partial streams, budgets pending activations.

A real server in a thread of this process, so that its budgets and its memory can be read.
"""

from __future__ import annotations

import gc
import queue
import time
import tracemalloc

import grpc
import pytest
import torch

from fedsea.config import ServerLimits
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.tensors import encode
from tests.integration.conftest import TINY
from tests.integration.memory_helpers import held_until, open_session, partial_chunk, serving, vm_size, wait_for

MIB = 1024 * 1024
GIB = 1024 * MIB
HIDDEN = TINY["hidden_size"]


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="reads /proc (Linux)")
def test_an_adapter_stream_declaring_7_gib_holds_only_its_14_kib():
    # The attack: 14 tensors of 512 MiB declared, 1 KiB of each sent, the stream left open.
    with serving(ServerLimits()) as (stub, servicer):
        session = open_session(stub)
        declared = (128 * MIB,)  # 512 MiB of float32, at the default max_tensor_bytes
        messages = [
            pb.NamedTensorChunk(session_id=session, name=f"t{i}", tensor=partial_chunk(declared, b"\1" * 1024))
            for i in range(14)
        ]
        more: queue.Queue[object | None] = queue.Queue()
        before = vm_size()
        call = stub.PutTrunkAdapter.future(held_until(more, messages), timeout=60)
        try:
            # Until the 14 KiB arrived (or the server reserved memory for what was declared).
            budget = getattr(servicer, "budget", None)
            assert wait_for(lambda: vm_size() - before > GIB or (budget is not None and budget.held() == 14 * 1024))
            grown = vm_size() - before
            assert grown < GIB, f"the server reserved {grown / MIB:.0f} MiB for 14 KiB"
        finally:
            more.put(None)
        with pytest.raises(grpc.RpcError) as info:
            call.result()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # the tensors never completed
        assert wait_for(lambda: servicer.budget.held() == 0 and servicer.budget.streams() == 0)


def test_an_adapter_stream_over_max_adapter_bytes_is_refused_as_it_arrives():
    with serving(ServerLimits(max_adapter_bytes=3 * MIB)) as (stub, servicer):
        session = open_session(stub)
        big = torch.zeros(4 * MIB // 4)  # 4 MiB of float32, in 1 MiB chunks
        messages = [
            pb.NamedTensorChunk(session_id=session if i == 0 else "", name="w", tensor=c)
            for i, c in enumerate(encode(big, pb.FLOAT32))
        ]
        with pytest.raises(grpc.RpcError) as info:
            stub.PutTrunkAdapter(iter(messages), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_adapter_bytes" in (info.value.details() or "")
        assert wait_for(lambda: servicer.budget.held() == 0)


def test_a_stalled_forward_is_refused_at_the_stream_deadline_and_freed():
    with serving(ServerLimits(stream_timeout_s=1.0)) as (stub, servicer):
        session = open_session(stub)
        shape = (64, 4096, HIDDEN)  # 64 MiB declared; 1 KiB sent, then nothing
        hidden = partial_chunk(shape, b"\0" * 1024)
        first = pb.ForwardRequest(session_id=session, step=0, lengths=[4096] * 64, hidden=hidden)
        more: queue.Queue[object | None] = queue.Queue()
        start = time.monotonic()
        call = stub.Forward(held_until(more, [first]), timeout=30)
        try:
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "stream_timeout_s" in (info.value.details() or "")
            assert time.monotonic() - start < 10
            assert servicer.budget.held() == 0 and servicer.budget.streams() == 0
        finally:
            more.put(None)


def test_a_partial_forward_is_freed_when_the_client_disconnects_or_its_session_closes():
    with serving(ServerLimits(stream_timeout_s=600)) as (stub, servicer):
        session = open_session(stub)
        shape = (64, 4096, HIDDEN)
        for end in ("disconnect", "close"):
            first = pb.ForwardRequest(session_id=session, hidden=partial_chunk(shape, b"\0" * MIB))
            more: queue.Queue[object | None] = queue.Queue()
            call = stub.Forward(held_until(more, [first]), timeout=60)
            assert wait_for(lambda: servicer.budget.held() == MIB)
            assert servicer.budget.streams() == 1
            if end == "disconnect":
                call.cancel()
                assert wait_for(lambda: servicer.budget.streams() == 0, timeout=5)
            else:
                stub.CloseSession(pb.CloseSessionRequest(session_id=session), timeout=30)
                assert wait_for(lambda: servicer.budget.held() == 0, timeout=5)  # freed before the stream ends
                more.put(pb.ForwardRequest(hidden=pb.TensorChunk()))
                with pytest.raises(grpc.RpcError) as info:
                    list(call)
                assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
            more.put(None)
            assert servicer.budget.held() == 0


def test_in_flight_bytes_are_budgeted_per_client():
    limits = ServerLimits(max_inflight_bytes_per_client=3 * MIB, stream_timeout_s=600)
    with serving(limits) as (stub, servicer):
        session = open_session(stub)
        shape = (64, 4096, HIDDEN)
        queues: list[queue.Queue[object | None]] = []
        calls = []  # kept: a call that is collected is cancelled
        try:
            for _ in range(2):  # 2 MiB held in two streams
                first = pb.ForwardRequest(session_id=session, hidden=partial_chunk(shape, b"\0" * MIB))
                queues.append(queue.Queue())
                calls.append(stub.Forward(held_until(queues[-1], [first]), timeout=60))
            assert wait_for(lambda: servicer.budget.held() == 2 * MIB)
            data = b"\0" * (2 * MIB)  # a third stream's 2 MiB would pass the client's 3 MiB
            first = pb.ForwardRequest(session_id=session, hidden=partial_chunk(shape, data))
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Forward(iter([first]), timeout=30))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_inflight_bytes_per_client" in (info.value.details() or "")
        finally:
            for q in queues:
                q.put(None)
        assert wait_for(lambda: servicer.budget.held() == 0)


def test_a_refused_stream_s_bytes_are_freed_without_a_garbage_collection():
    # 8 MiB arrive (traced by tracemalloc: the assembler's bytearray), then the stream stalls.
    with serving(ServerLimits(stream_timeout_s=1.0)) as (stub, servicer):
        session = open_session(stub)
        shape = (64, 4096, HIDDEN)
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            chunks = [partial_chunk(shape, b"\0" * MIB)]
            for i in range(1, 8):
                chunks.append(pb.TensorChunk())
                chunks[-1].CopyFrom(chunks[0])
                chunks[-1].offset = i * MIB
            requests = [pb.ForwardRequest(session_id=session, hidden=chunks[0])]
            requests += [pb.ForwardRequest(hidden=c) for c in chunks[1:]]
            more: queue.Queue[object | None] = queue.Queue()
            call = stub.Forward(held_until(more, requests), timeout=30)
            assert wait_for(lambda: servicer.budget.held() == 8 * MIB)
            assert tracemalloc.get_traced_memory()[0] - base > 7 * MIB
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            more.put(None)
            assert wait_for(lambda: tracemalloc.get_traced_memory()[0] - base < 2 * MIB, timeout=5)
        finally:
            tracemalloc.stop()
            gc.enable()
