"""``fedsea bench fuzz``: malformed requests on all 11 RPCs, and what the server did with them.

The harness starts ``fedsea serve`` on the tiny model as a subprocess (or fuzzes ``--server``),
with two tokens: ``fuzzer`` (a hostile client with a valid token) and ``good`` (an honest one).
Before fuzzing, the good client trains and generates once (``good_client``) as the reference;
then ``workers`` threads send ``requests`` seeded cases (``fuzz_cases``), each with its own open
session, while the main thread probes the server as a good client every ``probe_every_s``.
Afterwards the good client runs again and must match the reference bit for bit.

Reported (one JSON line): status counts (all, per RPC, per family), ``internal_unknown`` with
examples, ``crashes`` (the server process gone), ``hangs`` (a complete request still
unanswered at its ``deadline_s``: the server must then answer a probe within
``probe_timeout_s``), the slowest probe, the server's RSS before/after/peak, its log volume and
tracebacks, and ``bit_exact``.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fedsea.experiments.fuzz_cases import Case, make_case
from fedsea.experiments.fuzz_client import RawClient, probe
from fedsea.experiments.good_client import GoodResult, good_run
from fedsea.experiments.serve_proc import TINY_MODEL, ServeProcess

MB = 1e6


class _State:
    """Counters shared by the workers (under one lock)."""

    def __init__(self, requests: int) -> None:
        self.lock = threading.Lock()
        self.next = 0
        self.requests = requests
        self.statuses: Counter[str] = Counter()
        self.by_rpc: dict[str, Counter[str]] = {}
        self.by_family: dict[str, Counter[str]] = {}
        self.by_edit: dict[str, Counter[str]] = {}  # the hostile family's statuses by edit (fuzz_hostile)
        self.examples: list[dict[str, Any]] = []  # distinct INTERNAL/UNKNOWN (RPC, status, details)
        self.seen: set[tuple[str, str, str]] = set()
        self.internal: Counter[str] = Counter()  # INTERNAL/UNKNOWN by "RPC/family[/edit]"
        self.hangs: list[dict[str, Any]] = []
        self.slowest_s = 0.0
        self.stop = threading.Event()

    def take(self) -> int | None:
        with self.lock:
            if self.stop.is_set() or self.next >= self.requests:
                return None
            self.next += 1
            return self.next - 1

    def record(self, index: int, case: Case, status: str, details: str, seconds: float) -> None:
        with self.lock:
            self.statuses[status] += 1
            self.by_rpc.setdefault(case.rpc, Counter())[status] += 1
            self.by_family.setdefault(case.family, Counter())[status] += 1
            if case.edit:
                self.by_edit.setdefault(case.edit, Counter())[status] += 1
            self.slowest_s = max(self.slowest_s, seconds)
            if status in ("INTERNAL", "UNKNOWN"):
                self.internal[f"{case.rpc}/{case.family}{'/' + case.edit if case.edit else ''}"] += 1
            key = (case.rpc, status, details[:40] + case.edit)
            if status in ("INTERNAL", "UNKNOWN") and key not in self.seen and len(self.examples) < 30:
                self.seen.add(key)
                self.examples.append(
                    {
                        "case": index,
                        "rpc": case.rpc,
                        "family": case.family,
                        "edit": case.edit,
                        "status": status,
                        "details": details[:200],
                    }
                )


def _worker(
    state: _State, address: str, token: str | None, fingerprint: str, d: int, seed: int, deadline_s: float,
    stall_s: float, on_hang: Any,
) -> None:  # fmt: skip
    client = RawClient(address, token)
    try:
        target = client.open_target(fingerprint, d)
        while (index := state.take()) is not None:
            rng = random.Random(f"{seed}:{index}")  # each case a function of (seed, index) alone
            case = make_case(rng, target)
            if case.prep_forward is not None:
                client.prepare_forward(case, target, rng)
            start = time.perf_counter()
            status, reply, details = client.send(case, deadline_s, stall_s)
            seconds = time.perf_counter() - start
            state.record(index, case, status, details, seconds)
            if status == "DEADLINE_EXCEEDED" and not case.stall:
                with state.lock:
                    hang = {"case": index, "rpc": case.rpc, "family": case.family, "edit": case.edit}
                    state.hangs.append({**hang, "s": round(seconds, 2)})
                on_hang()
            if case.rpc == "OpenSession" and status == "OK" and reply is not None:
                from fedsea.wire import fedsea_pb2 as pb

                client.close_session(pb.OpenSessionResponse.FromString(reply).session_id)
            if case.closes_session and status == "OK":
                target = client.open_target(fingerprint, d)
    except Exception as exc:  # the server gone (a crash) or refusing the valid session: stop
        with state.lock:
            state.examples.append({"worker_error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        state.stop.set()
    finally:
        client.close()


def _tokens(directory: Path) -> tuple[Path, str, str]:
    from fedsea.wire.auth import TokenStore

    store = TokenStore()
    fuzzer, good = store.add("fuzzer"), store.add("good")
    path = directory / "tokens.json"
    store.save(path)
    return path, fuzzer, good


def bench_fuzz(
    requests: int,
    seed: int = 0,
    server: str | None = None,
    workers: int = 4,
    deadline_s: float = 10.0,
    stall_s: float = 1.0,
    probe_every_s: float = 1.0,
    probe_timeout_s: float = 10.0,
    serve_args: tuple[str, ...] = (),
    token: str | None = None,
    good_token: str | None = None,
) -> dict[str, Any]:
    """Fuzz a server (``server``, else a ``fedsea serve`` subprocess on the tiny model); see the module docstring.

    Args:
        requests: malformed requests to send in all.
        seed: the cases' seed (the same seed, the same cases).
        server: ``host:port`` of a running server on the tiny model (no crash or RSS figures then).
        workers: concurrent fuzzing threads (each with its own channel and session).
        deadline_s: a complete request unanswered this long is a hang.
        stall_s: deadline of the ``stall`` cases (streams left open on purpose).
        probe_every_s: how often the good client probes during the run.
        probe_timeout_s: a probe unanswered this long is a failure.
        serve_args: extra ``fedsea serve`` flags for the subprocess (e.g. limits).
        token, good_token: the two clients' tokens with ``server`` (default: none).
    """
    from fedsea.experiments.good_client import _parts
    from fedsea.model.fingerprint import model_fingerprint

    base, _ = _parts(TINY_MODEL)
    fingerprint, d = model_fingerprint(base), int(base.config.hidden_size)
    with tempfile.TemporaryDirectory(prefix="fedsea-fuzz-") as tmp:
        proc: ServeProcess | None = None
        if server is None:
            path, token, good_token = _tokens(Path(tmp))
            proc = ServeProcess(TINY_MODEL, ["--tokens", str(path), *serve_args])
            server = proc.address
        try:
            return _run(
                proc, server, token, good_token, fingerprint, d, requests, seed, workers, deadline_s, stall_s,
                probe_every_s, probe_timeout_s,
            )  # fmt: skip
        finally:
            if proc is not None:
                proc.stop()


def _run(
    proc: ServeProcess | None, address: str, token: str | None, good_token: str | None, fingerprint: str, d: int,
    requests: int, seed: int, workers: int, deadline_s: float, stall_s: float, probe_every_s: float,
    probe_timeout_s: float,
) -> dict[str, Any]:  # fmt: skip
    reference = good_run(address, token=good_token)
    rss_before = proc.rss() if proc is not None else 0
    state = _State(requests)
    probes: list[float] = []
    probe_errors: list[str] = []
    probe_lock = threading.Lock()

    def do_probe() -> None:
        ok, seconds, error = probe(address, good_token, fingerprint, probe_timeout_s)
        with probe_lock:
            probes.append(seconds)
            if not ok:
                probe_errors.append(error)

    start = time.perf_counter()
    threads = [
        threading.Thread(
            target=_worker, name=f"fuzz-{i}", daemon=True,
            args=(state, address, token, fingerprint, d, seed, deadline_s, stall_s, do_probe),
        )
        for i in range(workers)
    ]  # fmt: skip
    for t in threads:
        t.start()
    rss_peak, crashed = rss_before, False
    while any(t.is_alive() for t in threads):
        time.sleep(probe_every_s)
        if proc is not None:
            if not proc.alive():
                crashed = True
                state.stop.set()
                break
            rss_peak = max(rss_peak, proc.rss())
        do_probe()
    for t in threads:
        t.join(deadline_s + stall_s + 5)
    seconds = time.perf_counter() - start
    crashed = crashed or (proc is not None and not proc.alive())
    after: GoodResult | None = None
    good_error = ""
    rss_after = 0
    if not crashed:
        time.sleep(1.0)  # in-flight work finishes, buffers of ended calls are freed
        rss_after = proc.rss() if proc is not None else 0
        try:
            after = good_run(address, token=good_token)
        except Exception as exc:
            good_error = f"{type(exc).__name__}: {str(exc)[:300]}"
    result: dict[str, Any] = {
        "bench": "fuzz",
        "requests": state.next,
        "seed": seed,
        "workers": workers,
        "seconds": round(seconds, 1),
        "statuses": dict(state.statuses.most_common()),
        "internal_unknown": state.statuses["INTERNAL"] + state.statuses["UNKNOWN"],
        "internal_unknown_by_case": dict(state.internal.most_common()),
        "crashes": int(crashed),
        "hangs": len(state.hangs),
        "hang_cases": state.hangs[:20],
        "probes": len(probes),
        "probe_failures": len(probe_errors),
        "probe_errors": probe_errors[:5],
        "probe_max_s": round(max(probes, default=0.0), 3),
        "slowest_request_s": round(state.slowest_s, 3),
        "bit_exact": after is not None and after.same_as(reference),
        "good_client_error": good_error,
        "by_rpc": {rpc: dict(c.most_common()) for rpc, c in sorted(state.by_rpc.items())},
        "by_family": {f: dict(c.most_common()) for f, c in sorted(state.by_family.items())},
        "by_edit": {e: dict(c.most_common()) for e, c in sorted(state.by_edit.items())},
        "examples": state.examples,
    }
    if proc is not None:
        result.update(
            rss_before_mb=round(rss_before / MB, 1),
            rss_after_mb=round(rss_after / MB, 1),
            rss_peak_mb=round(rss_peak / MB, 1),
            rss_growth_mb=round((rss_after - rss_before) / MB, 1) if rss_after else None,
            server_log_lines=proc.log.lines,
            server_log_bytes=proc.log.bytes,
            server_tracebacks=proc.log.tracebacks,
            server_exit=proc.proc.returncode,
            server_log_tail=proc.log.tail[-5:] if crashed else [],
        )
    return result
