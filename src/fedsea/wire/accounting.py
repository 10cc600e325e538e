"""Bytes and seconds per RPC kind, on either side of the wire."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass


@dataclass
class RpcCounter:
    """Calls, bytes each way and seconds (network, compute) of one RPC kind."""

    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    network_s: float = 0.0  # waiting on the network (client: RPC wall time minus server compute)
    compute_s: float = 0.0  # computing (server: its own compute; client: the server's, as reported)


class TrafficMeter:
    """Thread-safe counters keyed by RPC name; ``as_dict()`` for reports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rpcs: dict[str, RpcCounter] = {}
        self.local_compute_s = 0.0

    def record(
        self, rpc: str, sent: int = 0, received: int = 0, network_s: float = 0.0, compute_s: float = 0.0
    ) -> None:
        """Count one call of ``rpc`` with its bytes and seconds."""
        with self._lock:
            counter = self._rpcs.setdefault(rpc, RpcCounter())
            counter.calls += 1
            counter.bytes_sent += sent
            counter.bytes_received += received
            counter.network_s += network_s
            counter.compute_s += compute_s

    def add_local_compute(self, seconds: float) -> None:
        """Add ``seconds`` of compute done on this side."""
        with self._lock:
            self.local_compute_s += seconds

    def rpc(self, name: str) -> RpcCounter:
        """A snapshot copy of the counter of RPC kind ``name`` (zeros if never called)."""
        with self._lock:
            return RpcCounter(**asdict(self._rpcs.get(name, RpcCounter())))

    @property
    def bytes_sent(self) -> int:
        """Bytes sent over all RPC kinds."""
        with self._lock:
            return sum(c.bytes_sent for c in self._rpcs.values())

    @property
    def bytes_received(self) -> int:
        """Bytes received over all RPC kinds."""
        with self._lock:
            return sum(c.bytes_received for c in self._rpcs.values())

    def as_dict(self) -> dict[str, object]:
        """Per-RPC counters and their totals, for reports."""
        with self._lock:
            rpcs = {name: asdict(c) for name, c in sorted(self._rpcs.items())}
            return {
                "rpcs": rpcs,
                "bytes_sent": sum(c.bytes_sent for c in self._rpcs.values()),
                "bytes_received": sum(c.bytes_received for c in self._rpcs.values()),
                "network_s": sum(c.network_s for c in self._rpcs.values()),
                "remote_compute_s": sum(c.compute_s for c in self._rpcs.values()),
                "local_compute_s": self.local_compute_s,
            }
