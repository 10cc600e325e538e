"""Emulated WAN conditions on a client's channel, to measure them on one machine.

Each message waits ``latency_ms`` (one way) plus its size over ``mbps`` before it is sent
or after it is received. The wait is real sleeping, so wall-clock measurements include it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class NetShaper:
    """One-way latency (milliseconds) and bandwidth (megabits per second; 0 = unlimited)."""

    latency_ms: float = 0.0
    mbps: float = 0.0

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

    def wait(self, nbytes: int) -> float:
        """Sleep for the one-way delay of ``nbytes``; return the seconds slept."""
        seconds = self.delay_s(nbytes)
        if seconds > 0:
            time.sleep(seconds)
        return seconds
