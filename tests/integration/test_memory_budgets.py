"""Issue 14, memory inside the default limits: pending activations, LoRA size, generation slots per client."""

from __future__ import annotations

import gc
import queue
import time

import grpc
import pytest
import torch

import fedsea
from fedsea.config import LoraSpec, OptimConfig, ServerLimits
from fedsea.server.trunk import SessionSpec, TrunkHost
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire import fedsea_pb2_grpc as pb_grpc
from fedsea.wire.auth import TokenStore
from fedsea.wire.tensors import encode
from tests.integration.conftest import TINY
from tests.integration.memory_helpers import Meta, bearer_of, held_until, open_session, partial_chunk, serving, wait_for

BATCH, TOKENS, HIDDEN = 4, 32, TINY["hidden_size"]  # the largest request these tests' limits allow
SMALL = {"max_batch": BATCH, "max_seq_len": TOKENS}


def forward(stub: pb_grpc.TrunkStub, session: str, metadata: Meta = (), step: int = 0) -> None:
    hidden = torch.randn(BATCH, TOKENS, HIDDEN)
    chunks = list(encode(hidden, pb.FLOAT32))
    requests = [pb.ForwardRequest(session_id=session, step=step, lengths=[TOKENS] * BATCH, hidden=chunks[0])]
    requests += [pb.ForwardRequest(hidden=c) for c in chunks[1:]]
    list(stub.Forward(iter(requests), metadata=metadata, timeout=30))


def backward(stub: pb_grpc.TrunkStub, session: str, metadata: Meta = (), step: int = 0) -> None:
    grad = next(encode(torch.randn(BATCH, TOKENS, HIDDEN), pb.FLOAT32))
    request = pb.BackwardRequest(session_id=session, step=step, update=True, grad=grad)
    list(stub.Backward(iter([request]), metadata=metadata, timeout=30))


def refused(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


def one_forward_bytes() -> int:
    """The activations a largest forward saves (measured by the host itself, without the wire)."""
    host = TrunkHost(fedsea.tiny_llama(**TINY), ServerLimits(**SMALL))
    spec = SessionSpec(2, 1, LoraSpec(r=2, alpha=4, dropout=0.0, target_modules=("q_proj",)), OptimConfig(), 0)
    session = host.open_session("x", host.fingerprint, spec)
    host.forward("x", session.id, 0, torch.randn(BATCH, TOKENS, HIDDEN), torch.full((BATCH,), TOKENS))
    return host.pending_bytes()


def test_forwards_never_followed_by_a_backward_hit_the_pending_budget():
    one = one_forward_bytes()
    assert one > BATCH * TOKENS * HIDDEN * 4  # more than the input: the blocks' saved tensors
    store = TokenStore()
    a, b = bearer_of(store.add("a")), bearer_of(store.add("b"))
    limits = ServerLimits(**SMALL, max_pending_bytes_per_client=int(2.5 * one), max_pending_bytes=int(3.5 * one))
    with serving(limits, store) as (stub, servicer):
        sessions = [open_session(stub, metadata=a) for _ in range(4)]
        forward(stub, sessions[0], a)
        forward(stub, sessions[1], a)
        for session in sessions[2:]:  # the four forwards: the last two are refused, not held
            code, details = refused(lambda s=session: forward(stub, s, a))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_pending_bytes_per_client" in details
        assert servicer.host.pending_bytes("a") == 2 * one
        other = [open_session(stub, metadata=b) for _ in range(2)]
        forward(stub, other[0], b)  # another client still computes, up to the server's budget
        code, details = refused(lambda: forward(stub, other[1], b))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_pending_bytes=" in details
        backward(stub, sessions[0], a)  # a backward frees its forward's activations
        assert servicer.host.pending_bytes("a") == one
        forward(stub, sessions[2], a)


def test_pending_activations_expire_and_their_backward_asks_for_the_forward_again():
    with serving(ServerLimits(**SMALL, pending_timeout_s=0.3)) as (stub, servicer):
        session = open_session(stub)
        forward(stub, session)
        assert servicer.host.pending_bytes() > 0
        time.sleep(0.6)
        # Expired by the server's reaper (or another session's step), never by its own backward:
        # a backward that has arrived is answered however long it queued for the compute thread.
        assert servicer.host.expire_pending() == 1
        code, details = refused(lambda: backward(stub, session))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "resend the forward" in details
        assert servicer.host.pending_bytes() == 0
        forward(stub, session)  # the same step again, then its backward
        backward(stub, session)
        forward(stub, session, step=1)


@pytest.mark.parametrize("rank", [300_000, 2**32 - 1])
def test_a_huge_lora_rank_is_refused_before_anything_is_allocated(rank):
    with serving(ServerLimits()) as (stub, servicer):
        code, details = refused(lambda: open_session(stub, r=rank))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_lora_rank=256" in details
        assert servicer.host.open_sessions() == 0
        open_session(stub, r=256)  # at the limit: fine


def test_lora_targets_and_adapter_bytes_have_limits():
    with serving(ServerLimits(max_adapter_bytes=16 * 1024)) as (stub, servicer):
        code, details = refused(lambda: open_session(stub, targets=["q_proj"] * 17))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_lora_targets=16" in details
        code, details = refused(lambda: open_session(stub, targets=["q" * 10_000]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 300  # the name is not echoed
        # r=8 on q, k, v, o of 3 blocks of width 64: 3 x 8 x (128 + 96 + 96 + 128) x 4 bytes = 43 KiB.
        code, details = refused(lambda: open_session(stub, r=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_adapter_bytes=16384" in details
        assert servicer.host.open_sessions() == 0
        open_session(stub, r=2)  # 3 x 2 x 128 x 4 = 3 KiB: fine


def _open_stream(stub: pb_grpc.TrunkStub, session: str, metadata: Meta, more: queue.Queue[object | None]):  # type: ignore[no-untyped-def]
    first = pb.GenerateRequest(open=pb.GenerateOpen(session_id=session, max_length=TOKENS))
    return stub.Generate(held_until(more, [first]), metadata=metadata, timeout=60)


def test_one_client_cannot_take_every_generation_slot():
    assert ServerLimits().max_generation_sessions_per_client < ServerLimits().max_generation_sessions
    store = TokenStore()
    a, b = bearer_of(store.add("a")), bearer_of(store.add("b"))
    limits = ServerLimits(**SMALL, max_generation_sessions=3, max_generation_sessions_per_client=2)
    with serving(limits, store) as (stub, servicer):
        mine, theirs = open_session(stub, metadata=a), open_session(stub, metadata=b)
        queues: list[queue.Queue[object | None]] = [queue.Queue() for _ in range(4)]
        try:
            calls = [_open_stream(stub, mine, a, q) for q in queues[:2]]
            assert wait_for(lambda: servicer.generation.count("a") == 2)
            extra = _open_stream(stub, mine, a, queues[2])
            code, details = refused(lambda: next(extra))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_generation_sessions_per_client=2" in details
            calls.append(_open_stream(stub, theirs, b, queues[3]))
            assert wait_for(lambda: servicer.generation.count("b") == 1)
        finally:
            for q in queues:
                q.put(None)


def test_the_kv_cache_budget_is_shared_per_client():
    # One row of 32 tokens through 3 blocks: 2 x 2 kv heads x 16 x 4 bytes x 3 x 32 = 24 KiB reserved.
    with serving(ServerLimits(**SMALL, max_cache_bytes_per_client=20_000)) as (stub, servicer):
        session = open_session(stub)
        hidden = next(encode(torch.randn(1, 4, HIDDEN), pb.FLOAT32))
        requests = [
            pb.GenerateRequest(open=pb.GenerateOpen(session_id=session, max_length=TOKENS)),
            pb.GenerateRequest(step=pb.GenerateStep(step=0, lengths=[4], hidden=hidden)),
        ]
        code, details = refused(lambda: list(stub.Generate(iter(requests), timeout=30)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_cache_bytes_per_client=20,000" in details
        assert servicer.generation.reserved_bytes() == 0


def test_a_half_sent_prefill_is_freed_at_the_stream_deadline():
    with serving(ServerLimits(**SMALL, stream_timeout_s=0.5)) as (stub, servicer):
        session = open_session(stub)
        hidden = partial_chunk((BATCH, TOKENS, HIDDEN), b"\0" * 1024)
        requests = [
            pb.GenerateRequest(open=pb.GenerateOpen(session_id=session, max_length=TOKENS)),
            pb.GenerateRequest(step=pb.GenerateStep(step=0, lengths=[TOKENS] * BATCH, hidden=hidden)),
        ]
        more: queue.Queue[object | None] = queue.Queue()
        call = stub.Generate(held_until(more, requests), timeout=30)
        try:
            code, details = refused(lambda: next(call))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "half-sent step" in details
            # Freed as the status goes out (the handler's ``finally``), with no garbage collection.
            assert wait_for(lambda: servicer.budget.held() == 0 and servicer.generation.count() == 0, timeout=2)
        finally:
            more.put(None)


def graph_tensors() -> int:
    """Live tensors that belong to an autograd graph (a pending forward's activations)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None)


def test_a_refused_request_keeps_no_activations_alive():
    """A refusal's error must not keep the frames it passed (one holds the session's pending step)
    alive: grpc keeps an aborted call's error after the call ends."""
    with serving(ServerLimits(**SMALL)) as (stub, servicer):
        session = open_session(stub)
        before = graph_tensors()
        forward(stub, session)
        code, _ = refused(lambda: forward(stub, session, step=1))  # out of order: its backward is due
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert graph_tensors() > before
        servicer.host.close_session("anonymous", session)  # as the idle reaper would: no further call
        assert servicer.host.pending_bytes() == 0
        assert graph_tensors() == before


@pytest.mark.parametrize("drop", ["expire", "close"])
def test_activations_of_a_forward_never_followed_by_a_backward_are_freed(drop):
    """No activation outlives its dropped forward (the measuring hook once kept each graph alive
    in a reference cycle through C++ that no garbage collection frees)."""
    host = TrunkHost(fedsea.tiny_llama(**TINY), ServerLimits(pending_timeout_s=0.01))
    spec = SessionSpec(2, 1, LoraSpec(r=4, dropout=0.0), OptimConfig(), pb.FLOAT32)
    session = host.open_session("a", host.fingerprint, spec)
    gc.collect()
    before = graph_tensors()
    host.forward("a", session.id, 0, torch.randn(2, 16, TINY["hidden_size"]), torch.tensor([16, 9]))
    assert host.pending_bytes("a") > 0 and graph_tensors() > before
    if drop == "expire":
        time.sleep(0.05)
        assert host.expire_pending() == 1
    else:
        host.close_session("a", session.id)
    gc.collect()
    assert host.pending_bytes("a") == 0
    assert graph_tensors() == before
