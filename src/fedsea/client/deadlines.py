"""Every client call has a deadline: one settings object, one error for a server that stopped answering.

A client of a frozen server (SIGSTOP, a hung host, a dropped route) would otherwise wait
forever: a gRPC call without a deadline never ends by itself, and a TCP connection to a frozen
process stays open. ``ClientTimeouts`` gives each kind of call its own deadline (a training
step takes longer than a decode step, a round is long in coming); ``Connection``
(``fedsea.client.connection``) applies them, retries included (one budget per call, not one
per attempt), and gRPC keepalive (``fedsea.wire.keepalive``) notices a dead peer within about
30 s even in a call whose deadline is longer. The client commands expose the fields as flags
(``--step-timeout-s`` and so on, ``fedsea.cli.generate.add_connection_args``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedsea.errors import RemoteError

# The kinds of call, each with its own deadline (a field ``<kind>_timeout_s`` of ``ClientTimeouts``).
CallKind = Literal["call", "step", "decode", "adapter", "round"]

# Closing a session is a courtesy (the server's idle timeout closes it anyway): a server that
# does not answer must not keep a client that is exiting (after an error, say) waiting long.
CLOSE_TIMEOUT_S = 5.0

# What each kind is, for the error message.
_WHAT: dict[str, str] = {
    "call": "a control call",
    "step": "a training step",
    "decode": "a decode step",
    "adapter": "an adapter transfer",
    "round": "the next round",
}


@dataclass(frozen=True)
class ClientTimeouts:
    """Deadlines of the client's calls, in seconds; each covers the call's retries too.

    Args:
        call_timeout_s (`float`): control calls (open and close a session, join a run, stats):
            the server answers them in milliseconds; the rest is room for a busy server.
        step_timeout_s (`float`): each Forward and Backward of a training step, and a
            generation's prefill: a full batch on a CPU server, queued behind other clients.
        decode_timeout_s (`float`): each decode step of a generation (one token per row):
            milliseconds of server compute, the rest is room for a queue.
        adapter_timeout_s (`float`): an adapter upload or download (put and get trunk adapter,
            submit a round's update): up to hundreds of MB on a slow link.
        round_timeout_s (`float`): waiting for the next round of a federated run: a round
            lasts up to the run's round timeout (600 s by default) plus aggregation, the first
            one comes after the join timeout (600 s); ``fedsea join`` raises it to fit the run file.
        reconnect_timeout_s (`float`): a generation whose server was lost reconnects, with
            backoff, for up to this long (a restart of ``fedsea serve``), then replays and goes
            on; 0: fail at once.
    """

    call_timeout_s: float = 30.0
    step_timeout_s: float = 300.0
    decode_timeout_s: float = 60.0
    adapter_timeout_s: float = 300.0
    round_timeout_s: float = 3600.0
    reconnect_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("call", "step", "decode", "adapter", "round"):
            value = getattr(self, f"{name}_timeout_s")
            if not value > 0:
                raise ValueError(f"{name}_timeout_s must be > 0 seconds, got {value}")
        if not self.reconnect_timeout_s >= 0:
            raise ValueError(f"reconnect_timeout_s must be >= 0 seconds, got {self.reconnect_timeout_s}")

    def seconds(self, kind: CallKind) -> float:
        """The deadline of a call of ``kind``."""
        value: float = getattr(self, f"{kind}_timeout_s")
        return value


class ServerNotAnsweringError(RemoteError):
    """The server did not answer a call within its deadline (frozen, overloaded or cut off), or
    left gRPC's keepalive pings unanswered (``keepalive``: frozen or gone, not merely slow).

    The code is ``DEADLINE_EXCEEDED``; the message names the address, the wait, and the fix.
    """

    def __init__(self, address: str, waited_s: float, kind: CallKind, keepalive: bool = False) -> None:
        if keepalive:
            why, fix = f"{_WHAT[kind]} in flight, keepalive pings unanswered", ""
        else:
            why, fix = f"waiting for {_WHAT[kind]}", f", or raise --{kind}-timeout-s if it is only slow"
        super().__init__(
            "DEADLINE_EXCEEDED",
            f"server {address} not answering for {waited_s:.0f} s ({why}): check that "
            f"`fedsea serve` is running there and reachable{fix}",
        )
        self.address = address
        self.waited_s = waited_s
        self.kind = kind


# gRPC's words for a transport closed by keepalive: the peer is frozen or gone, not slow.
KEEPALIVE_MARKS = ("ping timeout", "keepalive watchdog")


def keepalive_failed(details: str) -> bool:
    """Whether an UNAVAILABLE's ``details`` say keepalive closed the transport."""
    return any(mark in details for mark in KEEPALIVE_MARKS)


__all__ = ["CLOSE_TIMEOUT_S", "CallKind", "ClientTimeouts", "ServerNotAnsweringError", "keepalive_failed"]
