"""Emulated WAN conditions on a client's channel, to measure them on one machine.

Each message waits ``latency_ms`` (one way) plus its size over ``mbps`` before it is sent
or after it is received. The wait is real sleeping, so wall-clock measurements include it.
Messages in flight at once (pipelined micro-batches) share the bandwidth: each direction is
one link that carries one message after another (full duplex), while latencies overlap.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


class _Link:
    """When each direction of the emulated link is next free (``time.monotonic`` seconds)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.free_at = {False: 0.0, True: 0.0}  # keyed by downlink


@dataclass(frozen=True)
class NetShaper:
    """One-way latency (milliseconds) and bandwidth (megabits per second; 0 = unlimited)."""

    latency_ms: float = 0.0
    mbps: float = 0.0
    _link: _Link = field(default_factory=_Link, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms}")
        if self.mbps < 0:
            raise ValueError(f"mbps must be >= 0 (0 = unlimited), got {self.mbps}")

    @property
    def active(self) -> bool:
        """True when the shaper adds any latency or bandwidth limit."""
        return self.latency_ms > 0 or self.mbps > 0

    def delay_s(self, nbytes: int) -> float:
        """Seconds one message of ``nbytes`` takes one way."""
        transfer = nbytes * 8 / (self.mbps * 1e6) if self.mbps > 0 else 0.0
        return self.latency_ms / 1000 + transfer

    def wait(self, nbytes: int, downlink: bool = False) -> float:
        """Sleep for the one-way delay of ``nbytes`` (after the messages ahead of it on the same
        direction's link, if any are still in transfer); return the seconds slept."""
        transfer = nbytes * 8 / (self.mbps * 1e6) if self.mbps > 0 else 0.0
        now = time.monotonic()
        start = now
        if transfer > 0:
            with self._link.lock:
                start = max(now, self._link.free_at[downlink])
                self._link.free_at[downlink] = start + transfer
        seconds = start - now + transfer + self.latency_ms / 1000
        if seconds > 0:
            time.sleep(seconds)
        return seconds
