"""Refusals are statuses (issue 14, item 5): undecodable bytes, shape oddities and oversized
client strings get INVALID_ARGUMENT or NOT_FOUND with a short detail, one log line each
(rate-limited), and no traceback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
import torch

import fedsea
from fedsea.federation.config import FedConfig
from fedsea.federation.coordinator import coordinator_factory
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.handlers import rpc_kinds
from fedsea.server.refusals import RefusalLog
from fedsea.server.trunk import TrunkHost
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire import fedsea_pb2_grpc as pb_grpc
from fedsea.wire.tensors import encode
from tests.integration.conftest import TINY
from tests.integration.test_wire_security import _forward, _open

# A length-delimited field 1 that promises 5 bytes and brings 2: no message type decodes it.
UNDECODABLE = b"\x0a\x05ab"
# Each RPC and whether its requests and replies stream (from the proto).
RPCS = rpc_kinds()


@contextmanager
def _server(tmp_path, burst: int = 20) -> Iterator[tuple[str, TrunkServer]]:
    """A tiny-model server that coordinates a run (so that JoinRun, AwaitRound and SubmitUpdate parse)."""
    config = FedConfig(rounds=1, local_steps=1, expected_clients=1, lora=fedsea.LoraSpec(r=2), round_timeout_s=0.5)
    server = TrunkServer(TrunkHost(fedsea.tiny_llama(**TINY)), rounds=coordinator_factory(config, tmp_path, False))
    server.servicer.refusals = RefusalLog(logging.getLogger("fedsea.server.service"), burst=burst, window_s=3600)
    with ServerThread(server) as port:
        yield f"127.0.0.1:{port}", server


def _raw_call(channel: grpc.Channel, name: str, data: bytes) -> grpc.RpcError:
    """Send ``data`` as the only request message of ``name``, unserialized; the error it gets."""
    kind, path = RPCS[name], f"/fedsea.v1.Trunk/{name}"
    call = getattr(channel, kind)(path)  # no serializers: bytes in, bytes out
    with pytest.raises(grpc.RpcError) as info:
        reply = call(iter([data]) if kind.startswith("stream") else data, timeout=30)
        if kind.endswith("stream"):
            list(reply)
    return info.value


def test_undecodable_bytes_are_invalid_argument_on_every_rpc(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    with _server(tmp_path) as (address, _), grpc.insecure_channel(address) as channel:
        for name in RPCS:
            error = _raw_call(channel, name, UNDECODABLE)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.code(), error.details())
            assert error.details().startswith("request: undecodable"), name
        # The server still serves a well-formed request afterwards.
        assert pb_grpc.TrunkStub(channel).GetStats(pb.StatsRequest(), timeout=30).open_sessions == 0
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a refused request"
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert len(refused) == len(RPCS) and all("INVALID_ARGUMENT request: undecodable" in m for m in refused)


def _zero_dim_calls(stub: pb_grpc.TrunkStub, session: str, shape: list[int]) -> dict[str, object]:
    empty = pb.TensorChunk(dtype=pb.FLOAT32, shape=shape, total_bytes=0)
    hidden = pb.TensorChunk(dtype=pb.FLOAT32, shape=[shape[0], 0, 64], total_bytes=0)
    return {
        "Forward": lambda: list(stub.Forward(iter([pb.ForwardRequest(session_id=session, hidden=hidden)]))),
        "Backward": lambda: list(stub.Backward(iter([pb.BackwardRequest(session_id=session, grad=empty)]))),
        "PutTrunkAdapter": lambda: stub.PutTrunkAdapter(
            iter([pb.NamedTensorChunk(session_id=session, name="lora_A", tensor=empty)])
        ),
    }


def test_shape_oddities_are_invalid_argument_naming_the_field(server):
    with grpc.insecure_channel(server) as channel:
        stub = pb_grpc.TrunkStub(channel)
        session = _open(stub).session_id
        _forward(stub, session, torch.randn(2, 3, 64), [3, 3])  # a backward is pending
        for shape in ([2**62, 2**62, 0], [2**20, 2**20, 0], [2, 0, 64]):
            for name, call in _zero_dim_calls(stub, session, shape).items():
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, shape, info.value.details())
                assert info.value.details().split(":")[0] in ("hidden", "grad", "adapter", "adapter[lora_A]"), name
        # Ten thousand dimensions: refused by count, without quoting them back.
        many = pb.TensorChunk(dtype=pb.FLOAT32, shape=[1] * 10_000, total_bytes=4, data=b"\0" * 4)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Backward(iter([pb.BackwardRequest(session_id=session, grad=many)])))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "grad: shape has 10000 dimensions, more than 8"
        # A dimension past int32 (the product overflows int64 on the way) in an adapter.
        huge = pb.TensorChunk(dtype=pb.FLOAT32, shape=[2**40, 2**40, 1], total_bytes=4, data=b"\0" * 4)
        with pytest.raises(grpc.RpcError) as info:
            stub.PutTrunkAdapter(iter([pb.NamedTensorChunk(session_id=session, name="w", tensor=huge)]))
        assert (
            info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "adapter[w]: dimension 0" in info.value.details()
        )
        # The session is unharmed: its pending step still takes its backward.
        grad = next(encode(torch.randn(2, 3, 64), pb.FLOAT32))
        replies = list(stub.Backward(iter([pb.BackwardRequest(session_id=session, grad=grad)])))
        assert replies[0].step == 0


def test_a_16_kb_session_id_is_not_found_with_a_short_message(server):
    with grpc.insecure_channel(server) as channel:
        stub = pb_grpc.TrunkStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.CloseSession(pb.CloseSessionRequest(session_id="a" * 16384), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(info.value.details()) < 200 and "(16384 chars)" in info.value.details()
        # Control characters are escaped, not echoed.
        with pytest.raises(grpc.RpcError) as info:
            stub.GetTrunkAdapter(pb.AdapterRequest(session_id="x\n\x1b[2J"), timeout=30).next()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "\n" not in info.value.details()


def test_refusals_are_logged_one_line_each_up_to_the_rate(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    with _server(tmp_path, burst=5) as (address, server), grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TrunkStub(channel)
        for _ in range(12):
            with pytest.raises(grpc.RpcError):
                stub.CloseSession(pb.CloseSessionRequest(session_id="nope"), timeout=30)
        for _ in range(3):
            assert _raw_call(channel, "GetStats", UNDECODABLE).code() == grpc.StatusCode.INVALID_ARGUMENT
        total = server.servicer.refusals.total
    lines = [r.getMessage() for r in caplog.records if r.name == "fedsea.server.service"]
    close = [m for m in lines if m.startswith("refused CloseSession")]
    stats = [m for m in lines if m.startswith("refused GetStats")]
    assert len(close) == 5 and "muted" in close[-1] and all("NOT_FOUND" in m for m in close)
    assert len(stats) == 3  # another (code, RPC): its own allowance
    assert total == 15
    assert not [r for r in caplog.records if r.exc_info]
