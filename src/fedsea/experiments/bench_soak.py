"""``fedsea bench soak``: N honest clients training and generating against one server for T minutes.

The server is a ``fedsea serve`` subprocess on the tiny model (its RSS read from ``/proc``).
Each client is a thread with its own token (its own identity, as separate parties are: one
identity's limits, such as 8 open sessions, are not shared out among 48 clients) that loops
``good_client.good_run``: open a session, two training
steps, read back the trunk adapter, generate four tokens, close. Client ``i`` uses seed
``i % 4``; every run is compared bit for bit with that seed's reference, made alone before the
soak, so that concurrency leaking between sessions shows as a mismatch.

Reported (one JSON line): runs, errors (with the first few messages), mismatches, the
server's RSS sampled every ``sample_s`` (first, last, min, max, and the slope of a least-squares
line in MB per minute: flat memory is a slope near 0), and per-run latency (median, max).
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedsea.experiments.good_client import GoodResult, good_run
from fedsea.experiments.serve_proc import TINY_MODEL, ServeProcess
from fedsea.wire.auth import TokenStore

MB = 1e6
SEEDS = 4


def _slope_per_minute(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS (MB) over time (minutes); 0 with fewer than two samples."""
    if len(samples) < 2:
        return 0.0
    xs = [t / 60.0 for t, _ in samples]
    ys = [r / MB for _, r in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def bench_soak(
    clients: int = 4,
    minutes: float = 0.5,
    sample_s: float = 10.0,
    serve_args: tuple[str, ...] = (),
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Run the soak (see the module docstring) and return its figures.

    Args:
        clients: concurrent client threads.
        minutes: how long they keep starting runs (a run under way then finishes).
        sample_s: seconds between RSS samples of the server.
        serve_args: extra ``fedsea serve`` flags (limits).
        timeout_s: each client call's deadline (a call past it is an error).
    """
    store = TokenStore()
    tokens = [store.add(f"soak-{i}") for i in range(clients)]
    reference_token = store.add("soak-reference")
    with tempfile.TemporaryDirectory(prefix="fedsea-soak-") as tmp:
        store.save(Path(tmp) / "tokens.json")
        with ServeProcess(TINY_MODEL, ("--tokens", str(Path(tmp) / "tokens.json"), *serve_args)) as server:
            return _soak(server, tokens, reference_token, clients, minutes, sample_s, timeout_s)


def _soak(
    server: ServeProcess,
    tokens: list[str],
    reference_token: str,
    clients: int,
    minutes: float,
    sample_s: float,
    timeout_s: float,
) -> dict[str, Any]:
    """``bench_soak``'s figures against a running ``server``: client ``i`` calls with ``tokens[i]``."""
    references = {
        seed: good_run(server.address, seed=seed, timeout_s=timeout_s, token=reference_token) for seed in range(SEEDS)
    }
    lock = threading.Lock()
    runs: list[float] = []
    errors: list[str] = []
    mismatches = [0]
    stop = threading.Event()

    def client(index: int) -> None:
        seed = index % SEEDS
        while not stop.is_set():
            try:
                result: GoodResult = good_run(server.address, seed=seed, timeout_s=timeout_s, token=tokens[index])
            except Exception as exc:  # counted: an honest client's call must never fail
                with lock:
                    errors.append(f"client {index}: {type(exc).__name__}: {str(exc)[:200]}")
                if not server.alive():
                    return
                continue
            with lock:
                runs.append(result.seconds)
                mismatches[0] += not result.same_as(references[seed])

    threads = [threading.Thread(target=client, args=(i,), daemon=True, name=f"soak-{i}") for i in range(clients)]
    start = time.perf_counter()
    samples: list[tuple[float, int]] = [(0.0, server.rss())]
    for t in threads:
        t.start()
    end = start + minutes * 60.0
    while (now := time.perf_counter()) < end and server.alive():
        time.sleep(min(sample_s, max(0.0, end - now)))
        samples.append((time.perf_counter() - start, server.rss()))
    stop.set()
    for t in threads:
        t.join(timeout_s + 10)
    seconds = time.perf_counter() - start
    alive = server.alive()
    if alive:
        samples.append((seconds, server.rss()))
    rss = [r for _, r in samples if r]
    return {
        "bench": "soak",
        "clients": clients,
        "minutes": minutes,
        "seconds": round(seconds, 1),
        "runs": len(runs),
        "steps": 2 * len(runs),  # training steps (two per run)
        "generations": len(runs),
        "errors": len(errors),
        "error_examples": errors[:5],
        "mismatches": mismatches[0],
        "bit_exact": mismatches[0] == 0 and len(runs) > 0,
        "server_alive": alive,
        "run_s_median": round(statistics.median(runs), 3) if runs else None,
        "run_s_max": round(max(runs), 3) if runs else None,
        "rss_first_mb": round(rss[0] / MB, 1) if rss else None,
        "rss_last_mb": round(rss[-1] / MB, 1) if rss else None,
        "rss_min_mb": round(min(rss) / MB, 1) if rss else None,
        "rss_max_mb": round(max(rss) / MB, 1) if rss else None,
        "rss_slope_mb_per_min": round(_slope_per_minute([s for s in samples if s[1]]), 2),
        "rss_samples_mb": [[round(t, 1), round(r / MB, 1)] for t, r in samples],
        "server_tracebacks": server.log.tracebacks,
    }
