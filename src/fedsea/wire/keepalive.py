"""gRPC keepalive on both ends: a dead or frozen peer is noticed, not waited for forever.

HTTP/2 PING frames are answered by the peer's gRPC library, not by the application, so a
process that is killed, frozen (SIGSTOP, a swapped-out VM) or cut off by a dropped route stops
answering them while its kernel may still hold the TCP connection open. Without pings a call
to such a peer waits for its deadline (or forever, without one); with them gRPC closes the
transport after ``keepalive_time + keepalive_timeout`` and the call fails with UNAVAILABLE.

The two ends must agree: a server drops a client that pings more often than its
``min_recv_ping_interval_without_data_ms`` allows (GOAWAY ``too_many_pings`` after
``max_ping_strikes`` strikes), so the server accepts pings every ``SERVER_MIN_PING_INTERVAL_MS``,
half the client's period.

Defaults (why):

- client ping every ``CLIENT_KEEPALIVE_MS`` = 20 s, dead after ``CLIENT_KEEPALIVE_TIMEOUT_MS`` =
  10 s without the answer: a frozen server is noticed within about 30 s even in a long wait
  (a round, a slow step) that has a longer deadline; a ping is 17 bytes every 20 s.
- every ping's timeout (``grpc.http2.ping_timeout_ms``) is the keepalive timeout: gRPC sends
  no keepalive ping while another ping (e.g. its bandwidth probe) is unanswered, and that one
  would otherwise wait 60 s (measured: a SIGSTOPped server went unnoticed for the whole deadline).
- pings also without calls in flight and without data (``max_pings_without_data`` = 0): a
  client waiting for a round sends no data for minutes and must still be able to ping.
- server ping every ``SERVER_KEEPALIVE_MS`` = 60 s, dead after 20 s: a vanished client's
  streams (and the buffers they hold) are cancelled within about 80 s, not at the session's
  idle timeout.
- channel reconnect backoff from 0.5 s up to ``MAX_RECONNECT_BACKOFF_MS`` = 5 s (gRPC's default
  grows to 120 s): a server that comes back is found again within seconds.
"""

from __future__ import annotations

CLIENT_KEEPALIVE_MS = 20_000
CLIENT_KEEPALIVE_TIMEOUT_MS = 10_000
SERVER_KEEPALIVE_MS = 60_000
SERVER_KEEPALIVE_TIMEOUT_MS = 20_000
SERVER_MIN_PING_INTERVAL_MS = CLIENT_KEEPALIVE_MS // 2
MAX_RECONNECT_BACKOFF_MS = 5_000

Option = tuple[str, int]


def client_options(
    keepalive_ms: int = CLIENT_KEEPALIVE_MS, timeout_ms: int = CLIENT_KEEPALIVE_TIMEOUT_MS
) -> list[Option]:
    """Channel options of a client: ping the server every ``keepalive_ms``, give up after ``timeout_ms``.

    A ``keepalive_ms`` under ``SERVER_MIN_PING_INTERVAL_MS`` is refused by fedsea's server once
    the connection idles (too many pings): tests only, against a server they freeze.
    """
    if keepalive_ms <= 0 or timeout_ms <= 0:
        raise ValueError(f"keepalive period and timeout must be > 0 ms, got {keepalive_ms} and {timeout_ms}")
    return [
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Any ping in flight (keepalive's, or gRPC's own bandwidth probe) times out as fast: a
        # keepalive ping is not sent while another is unanswered, whose timeout is 60 s by default.
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def server_options(*base: Option) -> list[Option]:
    """Server options ``base`` and keepalive's: ping idle clients, accept the clients' pings (see the module)."""
    return [
        *base,
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.ping_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
    ]


__all__ = ["client_options", "server_options"]
