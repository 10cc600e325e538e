"""Sending fuzz cases: a raw gRPC channel (bytes in, bytes out) and the fuzzing client's session.

The raw multi-callables have no serializer, so a case's bytes reach the server exactly as
made, decodable or not; a structured case is a message serialized by the generated code.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from fedsea.experiments.fuzz_cases import RPCS, Case, Target, chunk, valid_open
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire import fedsea_pb2_grpc as pb_grpc
from fedsea.wire.auth import METADATA_KEY

SERVICE = "/fedsea.v1.Trunk/"
OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.max_send_message_length", 64 * 1024 * 1024)]
WRONG_TOKEN = "0" * 64


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The bearer-token metadata of a call (none without a token)."""
    return ((METADATA_KEY, f"Bearer {token}"),) if token else ()


class RawClient:
    """One channel to ``address`` with a raw multi-callable per RPC and the typed stub beside it."""

    def __init__(self, address: str, token: str | None) -> None:
        self.channel = grpc.insecure_channel(address, options=OPTIONS)
        self.stub = pb_grpc.TrunkStub(self.channel)
        self.token = token
        self.calls = {
            rpc: getattr(self.channel, kind)(SERVICE + rpc, request_serializer=None, response_deserializer=None)
            for rpc, kind in RPCS.items()
        }

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def open_target(self, fingerprint: str, hidden_size: int) -> Target:
        """Open a valid session (p = 1, q = 1, float32 wire) and read its adapter's names and shapes."""
        md = metadata(self.token)
        info = self.stub.OpenSession(valid_open(fingerprint), timeout=30, metadata=md)
        adapter: dict[str, list[int]] = {}
        for m in self.stub.GetTrunkAdapter(pb.AdapterRequest(session_id=info.session_id), timeout=30, metadata=md):
            if m.name and m.name not in adapter:
                adapter[m.name] = list(m.tensor.shape)
        return Target(info.session_id, hidden_size, fingerprint, list(adapter.items()))

    def close_session(self, session_id: str) -> None:
        """Close a session the fuzz opened (errors ignored: it may be gone already)."""
        with contextlib.suppress(grpc.RpcError):
            request = pb.CloseSessionRequest(session_id=session_id)
            self.stub.CloseSession(request, timeout=10, metadata=metadata(self.token))

    def prepare_forward(self, case: Case, target: Target, rng: Any) -> None:
        """A valid Forward at the Backward case's step and shape, so that its gradient meets an activation."""
        assert case.prep_forward is not None
        step, shape = case.prep_forward
        if len(shape) != 3 or not all(1 <= s <= 16 for s in shape[:2]) or shape[2] != target.hidden_size:
            return
        first = pb.ForwardRequest(session_id=target.session_id, step=step, hidden=chunk(rng, shape))
        first.lengths.extend([shape[1]] * shape[0])
        try:
            for _ in self.stub.Forward(iter([first]), timeout=10, metadata=metadata(self.token)):
                pass
        except grpc.RpcError:
            pass

    def send(self, case: Case, deadline_s: float, stall_s: float) -> tuple[str, bytes | None, str]:
        """Send ``case``; returns (status name, the unary response bytes if any, the error details)."""
        token = {"fuzzer": self.token, "none": None, "wrong": WRONG_TOKEN}[case.auth]
        md = metadata(token)
        timeout = stall_s if case.stall else deadline_s
        call = self.calls[case.rpc]
        kind = RPCS[case.rpc]
        done = threading.Event()

        def requests() -> Iterator[bytes]:
            yield from case.messages
            if case.stall:  # keep the stream open, sending nothing, until the call ends
                done.wait(stall_s + 2.0)

        try:
            if kind == "unary_unary":
                return "OK", call(case.messages[0], timeout=timeout, metadata=md), ""
            if kind == "unary_stream":
                for _ in call(case.messages[0], timeout=timeout, metadata=md):
                    pass
                return "OK", None, ""
            if kind == "stream_unary":
                return "OK", call(requests(), timeout=timeout, metadata=md), ""
            for _ in call(requests(), timeout=timeout, metadata=md):
                pass
            return "OK", None, ""
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
            details = err.details() if hasattr(err, "details") else str(err)
            return code.name, None, (details or "")[:300]
        finally:
            done.set()


def probe(address: str, token: str | None, fingerprint: str, timeout_s: float) -> tuple[bool, float, str]:
    """A good client's cheapest round trip that touches the session table: open, then close.

    Returns (answered, seconds, error); a fresh channel each time, as a new client would.
    """
    client = RawClient(address, token)
    start = time.perf_counter()
    try:
        info = client.stub.OpenSession(valid_open(fingerprint), timeout=timeout_s, metadata=metadata(token))
        client.stub.CloseSession(
            pb.CloseSessionRequest(session_id=info.session_id), timeout=timeout_s, metadata=metadata(token)
        )
        return True, time.perf_counter() - start, ""
    except grpc.RpcError as err:
        return False, time.perf_counter() - start, f"{err.code().name}: {(err.details() or '')[:200]}"
    finally:
        client.close()
