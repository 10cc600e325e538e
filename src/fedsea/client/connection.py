"""The client's channel to the trunk server: TLS, token, deadlines, retries, shaping, accounting."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from fedsea.errors import RemoteError
from fedsea.wire import fedsea_pb2_grpc as pb_grpc
from fedsea.wire.accounting import TrafficMeter
from fedsea.wire.auth import METADATA_KEY
from fedsea.wire.shaper import NetShaper

T = TypeVar("T")
# Transient failures worth resending the same message for.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class ClientTls:
    """PEM files: the CA that signed the server; the client's own certificate and key for mTLS."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both the client certificate and its key for mutual TLS, or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials from the CA and, for mutual TLS, the client's certificate and key."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


@dataclass(frozen=True)
class ConnectionConfig:
    """How to reach the server.

    Args:
        address: ``host:port``.
        tls: TLS files; ``None`` is plaintext (only sensible on loopback).
        token: this client's bearer token (``fedsea token add``).
        timeout_s: deadline of each RPC, in seconds.
        retries: resends of the same message on UNAVAILABLE or DEADLINE_EXCEEDED.
        max_message_bytes: largest message this client accepts.
        shaper: emulated latency and bandwidth (benchmarks).
    """

    address: str
    tls: ClientTls | None = None
    token: str | None = None
    timeout_s: float = 300.0
    retries: int = 3
    max_message_bytes: int = 64 * 1024 * 1024
    shaper: NetShaper = field(default_factory=NetShaper)


class Connection:
    """One gRPC channel with the trunk stub, metering every call."""

    def __init__(self, config: ConnectionConfig) -> None:
        self.config = config
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
        if config.tls is not None:
            self.channel = grpc.secure_channel(config.address, config.tls.credentials(), options=options)
        else:
            self.channel = grpc.insecure_channel(config.address, options=options)
        self.stub = pb_grpc.TrunkStub(self.channel)
        self.meter = TrafficMeter()
        self.metadata = ((METADATA_KEY, f"Bearer {config.token}"),) if config.token else ()

    def close(self) -> None:
        """Close the channel (open sessions on the server end by their idle timeout)."""
        self.channel.close()

    def retrying(self, attempt: Callable[[], T]) -> T:
        """Run ``attempt``, again on UNAVAILABLE or DEADLINE_EXCEEDED (up to ``retries`` times, backing
        off); any other failure, or the last, becomes ``RemoteError``. A retry must resend the same
        messages: ``attempt`` rebuilds them from the same payload, never from fresh noise."""
        delay = 0.2
        for tries in range(self.config.retries + 1):
            try:
                return attempt()
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
                if code in RETRYABLE and tries < self.config.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                details = err.details() if hasattr(err, "details") else str(err)
                raise RemoteError(code.name, details or "") from None
        raise AssertionError("unreachable")

    def unary(self, rpc: str, method: Callable[..., Any], request: Any) -> Any:
        """Call a unary RPC; the same request is resent on transient failures."""

        def attempt() -> Any:
            start = time.perf_counter()
            self.config.shaper.wait(request.ByteSize())
            response = method(request, timeout=self.config.timeout_s, metadata=self.metadata)
            self.config.shaper.wait(response.ByteSize(), downlink=True)
            wall = time.perf_counter() - start
            self.meter.record(rpc, sent=request.ByteSize(), received=response.ByteSize(), network_s=wall)
            return response

        return self.retrying(attempt)

    def stream(self, rpc: str, method: Callable[..., Any], requests: Callable[[], Iterator[Any]]) -> list[Any]:
        """Call a stream-stream (or stream-unary) RPC; ``requests()`` rebuilds the same messages on a retry.

        Returns the responses as a list. The server's reported compute time (``compute_s`` of
        the responses) is subtracted from the wall time to give the time spent on the network.
        """

        def attempt() -> list[Any]:
            messages = list(requests())
            sent = sum(m.ByteSize() for m in messages)
            start = time.perf_counter()
            self.config.shaper.wait(sent)
            result = method(iter(messages), timeout=self.config.timeout_s, metadata=self.metadata)
            responses = list(result) if hasattr(result, "__iter__") and not hasattr(result, "ByteSize") else [result]
            received = sum(r.ByteSize() for r in responses)
            self.config.shaper.wait(received, downlink=True)
            wall = time.perf_counter() - start
            compute = float(getattr(responses[0], "compute_s", 0.0)) if responses else 0.0
            self.meter.record(rpc, sent=sent, received=received, network_s=max(0.0, wall - compute), compute_s=compute)
            return responses

        return self.retrying(attempt)

    def collect(self, rpc: str, method: Callable[..., Any], request: Any, deadline: bool = True) -> list[Any]:
        """Call a response-streaming RPC and read all its messages (resent on transient failures).

        ``deadline=False`` waits without the per-RPC deadline (e.g. for a round that may be long in coming).
        """

        def attempt() -> list[Any]:
            if deadline:
                return list(method(request, timeout=self.config.timeout_s, metadata=self.metadata))
            return list(method(request, metadata=self.metadata))

        messages = self.retrying(attempt)
        self.meter.record(rpc, sent=request.ByteSize(), received=sum(m.ByteSize() for m in messages))
        return messages
