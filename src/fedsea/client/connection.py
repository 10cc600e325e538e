"""The client's channel to the trunk server: TLS, token, deadlines, keepalive, retries, shaping, accounting.

Every call has a deadline, by kind (``ClientTimeouts``: a training step, a decode step, a round
wait, ...); its retries share it, so a call ends by its deadline whatever happens, with
``ServerNotAnsweringError`` when the server did not answer in time. gRPC keepalive
(``fedsea.wire.keepalive``) closes the transport to a peer that stops answering pings.
"""

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
from fedsea.wire.keepalive import CLIENT_KEEPALIVE_MS, CLIENT_KEEPALIVE_TIMEOUT_MS, client_options
from fedsea.wire.shaper import NetShaper

from .deadlines import CallKind, ClientTimeouts, ServerNotAnsweringError, keepalive_failed
from .diagnose import explain

T = TypeVar("T")
# Transient failures worth resending the same message for (within the call's deadline). A
# DEADLINE_EXCEEDED is not: the call's budget is spent (see ``Connection.retrying``).
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
# An UNAVAILABLE this long after the try began came from a peer that took the connection and
# then did not answer (no HTTP/2 SETTINGS, a keepalive ping unanswered), not from a refusal.
STALLED_S = 1.0
# gRPC's words for the same: the connection attempt's own timeout.
STALL_MARK = "before receiving SETTINGS frame"


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
        timeouts: the deadline of each kind of call (``ClientTimeouts``), retries included.
        retries: resends of the same message on UNAVAILABLE, within the call's deadline.
        max_message_bytes: largest message this client accepts.
        shaper: emulated latency and bandwidth (benchmarks).
        keepalive_ms: ping the server every this many milliseconds (``fedsea.wire.keepalive``).
        keepalive_timeout_ms: a ping unanswered this long closes the transport (UNAVAILABLE).
    """

    address: str
    tls: ClientTls | None = None
    token: str | None = None
    timeouts: ClientTimeouts = field(default_factory=ClientTimeouts)
    retries: int = 3
    max_message_bytes: int = 64 * 1024 * 1024
    shaper: NetShaper = field(default_factory=NetShaper)
    keepalive_ms: int = CLIENT_KEEPALIVE_MS
    keepalive_timeout_ms: int = CLIENT_KEEPALIVE_TIMEOUT_MS


class Connection:
    """One gRPC channel with the trunk stub, metering every call.

    ``meter``: the counters to add to (a reconnection keeps the old connection's), else new ones.
    """

    def __init__(self, config: ConnectionConfig, meter: TrafficMeter | None = None) -> None:
        self.config = config
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            *client_options(config.keepalive_ms, config.keepalive_timeout_ms),
        ]
        if config.tls is not None:
            self.channel = grpc.secure_channel(config.address, config.tls.credentials(), options=options)
        else:
            self.channel = grpc.insecure_channel(config.address, options=options)
        self.stub = pb_grpc.TrunkStub(self.channel)
        self.meter = meter if meter is not None else TrafficMeter()
        self.metadata = ((METADATA_KEY, f"Bearer {config.token}"),) if config.token else ()

    def close(self) -> None:
        """Close the channel (open sessions on the server end by their idle timeout)."""
        self.channel.close()

    def deadline_s(self, kind: CallKind) -> float:
        """The deadline of a call of ``kind``, in seconds."""
        return self.config.timeouts.seconds(kind)

    def explain(self, code: str, details: str) -> str:
        """``details`` with the likely cause and fix in front (``fedsea.client.diagnose``)."""
        return explain(code, details, self.config.address, self.config.tls, self.config.token is not None)

    def not_answering(self, waited_s: float, kind: CallKind, keepalive: bool = False) -> ServerNotAnsweringError:
        """The error for a call of ``kind`` that got no answer in ``waited_s`` seconds (``keepalive``:
        its pings went unanswered)."""
        return ServerNotAnsweringError(self.config.address, waited_s, kind, keepalive)

    def retrying(self, attempt: Callable[[float], T], kind: CallKind = "call", cap_s: float | None = None) -> T:
        """Run ``attempt(seconds_left)`` within the deadline of ``kind``, again on UNAVAILABLE.

        A refusal (nothing listening, a TLS mismatch: UNAVAILABLE at once) is retried up to
        ``retries`` times, backing off, then is ``RemoteError``. A stall (a server that took the
        connection and never answered: UNAVAILABLE after a wait) is retried until the deadline,
        since a restarted server may take the call. Running out of the deadline, or keepalive
        finding the server frozen mid-call, is ``ServerNotAnsweringError``; any other failure
        ``RemoteError``.
        A retry must resend the same messages: ``attempt`` rebuilds them from the same payload,
        never from fresh noise. ``cap_s``: a shorter deadline for this call (a courtesy call).
        """
        budget = self.deadline_s(kind) if cap_s is None else min(cap_s, self.deadline_s(kind))
        start = time.monotonic()
        end = start + budget
        delay = 0.2
        tries = 0
        while True:
            began = time.monotonic()
            try:
                return attempt(max(0.001, end - began))
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
                details = (err.details() if hasattr(err, "details") else str(err)) or ""
                now = time.monotonic()
                left = end - now
                # Ours, not the server's (which says DEADLINE_EXCEEDED for its own idle timeout).
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and left <= 0.05 * budget:
                    raise self.not_answering(now - start, kind) from None
                if code not in RETRYABLE:
                    raise RemoteError(code.name, self.explain(code.name, details)) from None
                if keepalive_failed(details):  # frozen or gone: its session with it, no use retrying
                    raise self.not_answering(now - start, kind, keepalive=True) from None
                stalled = now - began >= STALLED_S or STALL_MARK in details
                if left > 0.01 and (stalled or tries < self.config.retries):
                    tries += 1
                    time.sleep(min(delay, left))
                    delay = min(2 * delay, 2.0)
                    continue
                if left <= 0.05 * budget:
                    raise self.not_answering(time.monotonic() - start, kind) from None
                raise RemoteError(code.name, self.explain(code.name, details)) from None

    def unary(
        self, rpc: str, method: Callable[..., Any], request: Any, kind: CallKind = "call", cap_s: float | None = None
    ) -> Any:
        """Call a unary RPC; the same request is resent on transient failures."""

        def attempt(timeout: float) -> Any:
            start = time.perf_counter()
            self.config.shaper.wait(request.ByteSize())
            response = method(request, timeout=timeout, metadata=self.metadata)
            self.config.shaper.wait(response.ByteSize(), downlink=True)
            wall = time.perf_counter() - start
            self.meter.record(rpc, sent=request.ByteSize(), received=response.ByteSize(), network_s=wall)
            return response

        return self.retrying(attempt, kind, cap_s)

    def stream(
        self, rpc: str, method: Callable[..., Any], requests: Callable[[], Iterator[Any]], kind: CallKind = "step"
    ) -> list[Any]:
        """Call a stream-stream (or stream-unary) RPC; ``requests()`` rebuilds the same messages on a retry.

        Returns the responses as a list. The server's reported compute time (``compute_s`` of
        the responses) is subtracted from the wall time to give the time spent on the network.
        """

        def attempt(timeout: float) -> list[Any]:
            messages = list(requests())
            sent = sum(m.ByteSize() for m in messages)
            start = time.perf_counter()
            self.config.shaper.wait(sent)
            result = method(iter(messages), timeout=timeout, metadata=self.metadata)
            responses = list(result) if hasattr(result, "__iter__") and not hasattr(result, "ByteSize") else [result]
            received = sum(r.ByteSize() for r in responses)
            self.config.shaper.wait(received, downlink=True)
            wall = time.perf_counter() - start
            compute = float(getattr(responses[0], "compute_s", 0.0)) if responses else 0.0
            self.meter.record(rpc, sent=sent, received=received, network_s=max(0.0, wall - compute), compute_s=compute)
            return responses

        return self.retrying(attempt, kind)

    def collect(self, rpc: str, method: Callable[..., Any], request: Any, kind: CallKind = "adapter") -> list[Any]:
        """Call a response-streaming RPC and read all its messages (resent on transient failures)."""

        def attempt(timeout: float) -> list[Any]:
            return list(method(request, timeout=timeout, metadata=self.metadata))

        messages = self.retrying(attempt, kind)
        self.meter.record(rpc, sent=request.ByteSize(), received=sum(m.ByteSize() for m in messages))
        return messages
