"""The trunk server's own multi-tenant throughput: recorded sessions replayed without client compute.

``fedsea bench serve`` runs clients and server on one machine, so its ``multitenant_speedup``
also charges the server for the clients' head, tail and LM head (on this 2-core machine about
as much CPU as the trunk itself), which real clients run on machines of their own. With
``--replay`` the benchmark also records every trunk step of the one-at-a-time phase (the head's
states sent, the lengths, the trunk's answers) and sends the same steps again over new
inference streams of the same sessions, first one session at a time, then all at once: the
server does exactly the work of the live run, and this process only encodes and decodes
messages. ``replay_speedup`` is the ratio of the two; the answers are compared with the
recorded ones (one at a time: bit for bit; all at once: within the joint pass's rounding).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class TimedStepper:
    """A trunk stepper that notes when each of its steps was answered (``times``)."""

    def __init__(self, inner: Any, times: list[float]) -> None:
        self.inner, self.times = inner, times

    def step(self, *args: Any) -> torch.Tensor:
        """The inner step, its answer time noted."""
        out: torch.Tensor = self.inner.step(*args)
        self.times.append(time.perf_counter())
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def gaps(times: list[list[float]]) -> list[float]:
    """Milliseconds between each session's successive trunk answers (its decode steps)."""
    return [1000 * (b - a) for t in times for a, b in itertools.pairwise(t)]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` (nearest rank; 0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Recording:
    """One generation's trunk traffic: the stream's length limit and each step's input and answer."""

    max_length: int = 0
    steps: list[tuple[int, torch.Tensor, torch.Tensor | None, list[int] | None]] = field(default_factory=list)
    answers: list[torch.Tensor] = field(default_factory=list)


class RecordingStepper:
    """A trunk stepper that records what it sends and receives (``Recording``)."""

    def __init__(self, inner: Any, record: Recording) -> None:
        self.inner, self.record = inner, record

    def step(
        self, step: int, hidden: torch.Tensor, lengths: torch.Tensor | None, keep_rows: list[int] | None
    ) -> torch.Tensor:
        """The inner step, its input and answer recorded."""
        out: torch.Tensor = self.inner.step(step, hidden, lengths, keep_rows)
        kept = None if keep_rows is None else list(keep_rows)
        self.record.steps.append((step, hidden.clone(), None if lengths is None else lengths.clone(), kept))
        self.record.answers.append(out.clone())
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _replay_one(client: Any, record: Recording, times: list[float]) -> list[torch.Tensor]:
    stepper = client.stepper(record.max_length)
    try:
        outs = []
        for step, hidden, lengths, keep in record.steps:
            outs.append(stepper.step(step, hidden, lengths, keep))
            times.append(time.perf_counter())
        return outs
    finally:
        stepper.close()


def run_together(
    count: int, target: Callable[[int], None], started: Callable[[], None] | None = None
) -> tuple[float, list[str]]:
    """Run ``target(i)`` for every i < count in threads released at the same moment.

    ``started`` runs once the threads are waiting (a monitor's start). Returns the seconds from
    their release until the last ended, and one line per session whose target raised.
    """
    errors: list[str] = []
    barrier = threading.Barrier(count + 1)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except Exception as exc:
            errors.append(f"session {i}: {type(exc).__name__}: {str(exc)[:200]}")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    if started is not None:
        started()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, errors


def _largest_difference(got: list[list[torch.Tensor]], want: list[Recording]) -> float:
    """max over every answer of max |got - want| / max |want|."""
    worst = 0.0
    for outs, record in zip(got, want, strict=True):
        for a, b in zip(outs, record.answers, strict=True):
            worst = max(worst, float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12))
    return worst


def replay(clients: list[Any], records: list[Recording]) -> dict[str, Any]:
    """Replay ``records`` (one per session, through that session's client) alone, then all at once."""
    count = len(records)
    seq_times: list[list[float]] = [[] for _ in range(count)]
    t0 = time.perf_counter()
    alone = [_replay_one(clients[i], records[i], seq_times[i]) for i in range(count)]
    seq_s = time.perf_counter() - t0

    together: list[list[torch.Tensor]] = [[] for _ in range(count)]
    conc_times: list[list[float]] = [[] for _ in range(count)]

    def worker(i: int) -> None:
        together[i] = _replay_one(clients[i], records[i], conc_times[i])

    conc_s, errors = run_together(count, worker)
    steps = sum(len(r.steps) for r in records)
    return {
        "replay_steps": steps,
        "replay_sequential_s": round(seq_s, 2),
        "replay_concurrent_s": round(conc_s, 2),
        "replay_speedup": round(seq_s / conc_s, 2) if not errors else 0.0,
        "replay_identical_alone": all(
            torch.equal(a, b)
            for outs, r in zip(alone, records, strict=True)
            for a, b in zip(outs, r.answers, strict=True)
        ),
        "replay_max_rel_diff_together": _largest_difference(together, records) if not errors else None,
        "replay_errors": errors[:3],
        "replay_times": (seq_times, conc_times),
    }
