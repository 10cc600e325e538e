"""A client's link to a running trunk server, measured for ``fedsea plan`` (``fedsea profile --server``).

Latency: half the median round trip of a tiny unary call (``GetStats``). Bandwidth: real split
training steps, whose four (B, n, d) messages take, beyond four one-way latencies and the
server's half of the codec's CPU time, their size over the bandwidth; the client's meters give
each step's network time apart from the server's compute (``fedsea.client.connection``). The
server's wait for its compute thread counts as network time: measure against an idle server. A transfer time within the
measurement's noise (under 5% of the wire's time) reads as unlimited bandwidth: the latency
then decides.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from fedsea.client.split_client import SplitClient
from fedsea.federation.planner import MESSAGES_PER_STEP, Link
from fedsea.training.batch import Batch
from fedsea.wire import fedsea_pb2 as pb

PINGS = 10  # round trips timed for the latency (after one warm-up)
STEPS = 3  # training steps timed for the bandwidth (after one warm-up)
NOISE_SHARE = 0.05  # a transfer time under this share of the wire's time is noise: unlimited


@dataclass(frozen=True)
class LinkMeasure:
    """The measured link, and the figures it was read from (seconds)."""

    link: Link
    round_trip_s: float
    wire_s: float
    message_bytes: int


def _network_s(client: SplitClient) -> float:
    connection, _ = client.require_connection()
    return float(connection.meter.as_dict()["network_s"])  # type: ignore[arg-type]


def measure_link(
    client: SplitClient, batch: Batch, codec_s: float, pings: int = PINGS, steps: int = STEPS
) -> LinkMeasure:
    """Latency and bandwidth of ``client``'s connected server, from pings and training steps on ``batch``.

    Args:
        client: a connected client (its session trains, so its trunk adapter moves: use a fresh one).
        batch: the run's batch shape (B, n): the steps send its (B, n, d) messages.
        codec_s: the profile's encode + decode time of one message (``PartyProfile.codec_s``).
        pings, steps: round trips and steps timed (medians and means).
    """
    connection, _ = client.require_connection()
    trips = []
    for _ in range(pings + 1):
        start = time.perf_counter()
        connection.unary("stats", connection.stub.GetStats, pb.StatsRequest())
        trips.append(time.perf_counter() - start)
    round_trip = statistics.median(trips[1:])
    client.train_step(batch)  # warm-up: the session's first step allocates
    before = _network_s(client)
    for _ in range(steps):
        client.train_step(batch)
    wire = (_network_s(client) - before) / steps
    hidden = int(client.split.model.config.hidden_size)
    message = int(batch.input_ids.numel()) * hidden * int(client.stats()["wire_itemsize"])
    # The client encodes before its call starts and decodes after it ends: only the server's half
    # of each message's codec time is inside the network time.
    transfer = wire - MESSAGES_PER_STEP * (round_trip / 2 + codec_s / 2)
    mbps = MESSAGES_PER_STEP * message * 8 / transfer / 1e6 if transfer > NOISE_SHARE * wire else None
    return LinkMeasure(Link(round_trip / 2 * 1000, mbps), round_trip, wire, message)
