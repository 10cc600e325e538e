"""``fedsea bench serve``: a multi-tenant trunk server's throughput (issue 17, item 2).

``clients`` clients (tokens of their own) open ``sessions_each`` sessions each on one ``fedsea
serve`` process; every session gets a random trunk adapter of its own (non-zero B) and a prompt
of its own length. Each session generates ``new_tokens`` greedily, first one session at a time
(the server then runs every step alone), then all at once (the server joins their steps into
shared trunk passes, ``fedsea.server.multitenant``). Printed: the aggregate tokens per second of
both, their ratio ``multitenant_speedup``, the per-token latency (p50/p99 of the gaps between a
session's successive trunk answers), whether every session generated the same tokens both
times, and the server's memory: its peak resident set (``VmHWM``) and the peak KV-cache bytes
reserved by its streams (an operator's ``GetStats``), against the server's cache budget.

Client and server share the machine, as in ``fedsea bench generate``: the client side competes
with the server for the same cores (``server_threads`` sets the server's torch threads; on this
2-core machine one thread leaves the clients a core instead of spinning OpenMP workers). One at a
time, the sessions run in this process; all at once, in threads of this process, or with
``client_processes`` each client in a process of its own (its sessions in threads): 16 sessions
in one Python process are bound by its one GIL rather than by the server. Client-side torch ops
run on one thread in both phases (16 sessions' OpenMP teams would oversubscribe the cores).

Each client joins its own sessions' head and tail calls into shared passes
(``fedsea.training.shared_parts``), as a client answering several requests at once does;
``client_joint=False`` runs every call alone. Each client has its own split (views over one set
of weights), so no pass mixes two clients. ``client_passes`` counts the clients' passes and the
calls they carried all at once; ``concurrent_cpu_s`` (client processes only) the CPU seconds the
server, this process and the clients used all at once. ``replay`` also measures the server
alone, the recorded trunk steps sent again without client compute (``fedsea.experiments.bench_replay``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from fedsea.config import LoraSpec, SplitConfig
from fedsea.experiments.bench_replay import TimedStepper, gaps, percentile, run_together
from fedsea.model.load import DEFAULT_MODEL


def _client_process(job: tuple[Any, ...], ready: Any, go: Any, results: Any) -> None:
    """One client's sessions in a process of its own: connect, put the same adapters, warm up, wait for
    ``go``, generate in threads; put (session, tokens, answer times, error) per session on ``results``."""
    from fedsea.client.split_client import SplitClient
    from fedsea.model.load import load_model
    from fedsea.model.split import split_model
    from fedsea.training.shared_parts import JointStats, joint_parts

    address, token, indices, prompts, new_tokens, model, head_layers, tail_layers, lora_rank = job[:9]
    client_joint, client_wait_ms = job[9:]
    torch.set_num_threads(1)
    split = split_model(load_model(model), head_layers, tail_layers)
    joint_parts(split).enabled = client_joint
    if client_wait_ms is not None:
        joint_parts(split).wait_ms = client_wait_ms
    spec = LoraSpec(r=lora_rank, dropout=0.0)
    sessions = []
    for i, ids in zip(indices, prompts, strict=True):
        client = SplitClient(address, split, token=token, trunk_lora=spec, seed=i).connect()
        g = torch.Generator().manual_seed(100 + i)
        client.put_trunk_adapter(
            {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in client.trunk_adapter().items()}
        )
        client.generate_ids(ids[:, :8], torch.tensor([min(8, ids.shape[1])]), max_new_tokens=2, eos_token_id=())
        sessions.append(client)
    parts = joint_parts(split)
    parts.stats = JointStats()  # the concurrent phase's passes only
    ready.put(True)
    go.wait()

    def run(slot: int) -> None:
        client, ids = sessions[slot], prompts[slot]
        times: list[float] = []
        inner = client.stepper
        client.stepper = lambda *a, **k: TimedStepper(inner(*a, **k), times)  # type: ignore[method-assign,assignment]
        try:
            out = client.generate_ids(ids, torch.tensor([ids.shape[1]]), max_new_tokens=new_tokens, eos_token_id=())
            results.put((indices[slot], list(out.token_ids[0]), times, ""))
        except Exception as exc:
            results.put(
                (indices[slot], None, times, f"session {indices[slot]}: {type(exc).__name__}: {str(exc)[:200]}")
            )

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put((-1, None, [], _pass_counts(parts.stats)))
    for client in sessions:
        client.close()


def _pass_counts(stats: Any) -> dict[str, int]:
    """A client's ``JointStats`` as counts: head/tail passes and the calls they carried."""
    return {f"{part}_{what}": getattr(stats, what)[part] for part in ("head", "tail") for what in ("passes", "calls")}


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss(pid: int) -> int:
    """``VmHWM``: the process's peak resident memory so far, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_serve(
    model: str = DEFAULT_MODEL,
    clients: int = 4,
    sessions_each: int = 4,
    prompt_tokens: tuple[int, int] = (32, 128),
    new_tokens: int = 32,
    head_layers: int = SplitConfig.head_layers,
    tail_layers: int = SplitConfig.tail_layers,
    joint_wait_ms: float = 0.0,
    lora_rank: int = 8,
    client_processes: bool = False,
    client_joint: bool = True,
    server_threads: int | None = None,
    replay: bool = False,
    client_wait_ms: float | None = None,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) on the CPU in float32; returns its figures."""
    # One intra-op thread on the client side: its 16 sessions compute in 16 threads of this process, and
    # each thread calling torch would spin up OpenMP workers of its own (oversubscribing the cores the
    # server needs); 16 real clients would each have machines of their own.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bench_serve(
            model, clients, sessions_each, prompt_tokens, new_tokens, head_layers, tail_layers, joint_wait_ms,
            lora_rank, client_processes, client_joint, server_threads, replay, client_wait_ms,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads_before)


def _progress(text: str) -> None:
    print(f"bench serve: {text}", file=sys.stderr, flush=True)


def _bench_serve(
    model: str,
    clients: int,
    sessions_each: int,
    prompt_tokens: tuple[int, int],
    new_tokens: int,
    head_layers: int,
    tail_layers: int,
    joint_wait_ms: float,
    lora_rank: int,
    client_processes: bool,
    client_joint: bool,
    server_threads: int | None,
    replay: bool,
    client_wait_ms: float | None,
) -> dict[str, Any]:
    from fedsea.client.split_client import SplitClient
    from fedsea.experiments.bench_replay import Recording, RecordingStepper
    from fedsea.experiments.bench_replay import replay as replay_steps
    from fedsea.experiments.serve_proc import ServeProcess
    from fedsea.model.load import load_model
    from fedsea.model.split import split_model
    from fedsea.training.shared_parts import JointStats, joint_parts
    from fedsea.wire import fedsea_pb2 as pb
    from fedsea.wire.auth import TokenStore

    store = TokenStore()
    # Client 0 is an operator: it may read the server-wide cache figures (GetStats).
    tokens = [store.add(f"tenant-{c}", role="operator" if c == 0 else "client") for c in range(clients)]
    count = clients * sessions_each
    low, high = prompt_tokens
    gen = torch.Generator().manual_seed(0)
    base = load_model(model)
    # One split per client (views over the same weights; no LoRA on head and tail): a client joins
    # its own sessions' head and tail passes (``fedsea.training.shared_parts``), never another's.
    splits = [split_model(base, head_layers, tail_layers) for _ in range(clients)]
    for split in splits:
        joint_parts(split).enabled = client_joint
        if client_wait_ms is not None:
            joint_parts(split).wait_ms = client_wait_ms
    vocab = int(base.config.vocab_size)
    lengths = [low + (high - low) * i // max(1, count - 1) for i in range(count)]
    prompts = [torch.randint(3, vocab, (1, n), generator=gen) for n in lengths]
    spec = LoraSpec(r=lora_rank, dropout=0.0)
    with tempfile.TemporaryDirectory(prefix="fedsea-bench-serve-") as tmp:
        store.save(Path(tmp) / "tokens.json")
        args = ("--tokens", str(Path(tmp) / "tokens.json"), "--joint-wait-ms", str(joint_wait_ms))
        env = {"OMP_NUM_THREADS": str(server_threads)} if server_threads else None
        with ServeProcess(model, args, env=env) as server:
            rss_loaded = server.rss()
            sessions = [
                SplitClient(server.address, splits[c], token=tokens[c], trunk_lora=spec, seed=i).connect()
                for i, c in ((i, i // sessions_each) for i in range(count))
            ]
            try:
                for i, client in enumerate(sessions):  # a random adapter of its own (peft starts B at zero)
                    g = torch.Generator().manual_seed(100 + i)
                    state = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in client.trunk_adapter().items()}
                    client.put_trunk_adapter(state)
                operator = sessions[0].connection
                assert operator is not None
                reserved_peak = [0]
                sampling = threading.Event()

                def sample() -> None:
                    while not sampling.wait(0.05):
                        stats = operator.stub.GetStats(pb.StatsRequest(), metadata=operator.metadata)
                        reserved_peak[0] = max(reserved_peak[0], int(stats.server_reserved_bytes))

                def run(i: int, times: list[float], record: Recording | None = None) -> list[int]:
                    client = sessions[i]
                    inner = client.stepper

                    def opened(max_length: int, *a: Any, **k: Any) -> TimedStepper:
                        stepper: Any = inner(max_length, *a, **k)
                        if record is not None:  # for the replay: what it sent and received
                            record.max_length = max_length
                            stepper = RecordingStepper(stepper, record)
                        return TimedStepper(stepper, times)

                    client.stepper = opened  # type: ignore[method-assign,assignment]
                    try:
                        ids = prompts[i]
                        out = client.generate_ids(
                            ids, torch.tensor([ids.shape[1]]), max_new_tokens=new_tokens, eos_token_id=()
                        )
                    finally:
                        del client.stepper
                    return list(out.token_ids[0])

                for i in range(count):  # warm-up: every session's adapter and the kernels' shapes
                    warm = prompts[i][:, :8]
                    sessions[i].generate_ids(warm, torch.tensor([warm.shape[1]]), max_new_tokens=2, eos_token_id=())
                rss_warm = server.rss()
                _progress(f"{count} sessions warm; one at a time ...")
                seq_times: list[list[float]] = [[] for _ in range(count)]
                t0 = time.perf_counter()
                records = [Recording() for _ in range(count)] if replay else None
                alone = [run(i, seq_times[i], records[i] if records else None) for i in range(count)]
                seq_s = time.perf_counter() - t0

                conc_times: list[list[float]] = [[] for _ in range(count)]
                together: list[list[int] | None] = [None] * count
                errors: list[str] = []
                procs: list[Any] = []
                client_passes: dict[str, int] = {}
                cpu: dict[str, float] = {}
                for split in splits:
                    joint_parts(split).stats = JointStats()  # the concurrent phase's passes only
                if client_processes:
                    _progress(f"one at a time: {seq_s:.1f} s; all at once, from {clients} client processes ...")
                    # Each client its own process (4 sessions in threads each): 16 sessions in one Python
                    # process would be bound by its one GIL, not by the server. The same seeds, so the same adapters.
                    ctx = mp.get_context("spawn")
                    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
                    for c in range(clients):
                        indices = list(range(c * sessions_each, (c + 1) * sessions_each))
                        job = (server.address, tokens[c], indices, [prompts[i] for i in indices], new_tokens, model,
                               head_layers, tail_layers, lora_rank, client_joint, client_wait_ms)  # fmt: skip
                        procs.append(ctx.Process(target=_client_process, args=(job, ready, go, results), daemon=True))
                    for proc in procs:
                        proc.start()
                    for _ in range(clients):
                        ready.get(timeout=600)
                    monitor = threading.Thread(target=sample, daemon=True)
                    monitor.start()
                    _progress(f"{clients} client processes ready: go")
                    cpu0 = [_cpu_s(pid) for pid in (server.pid, os.getpid(), *(proc.pid for proc in procs))]
                    t0 = time.perf_counter()
                    go.set()
                    for _ in range(count + clients):
                        i, ids, times, error = results.get(timeout=900)
                        if i < 0:  # a client's pass counts (its last message)
                            for key, value in error.items():
                                client_passes[key] = client_passes.get(key, 0) + value
                            continue
                        together[i], conc_times[i] = ids, times
                        if error:
                            errors.append(error)
                    conc_s = time.perf_counter() - t0
                else:  # every session in a thread of this process
                    _progress(f"one at a time: {seq_s:.1f} s; all at once ...")

                    def worker(i: int) -> None:
                        together[i] = run(i, conc_times[i])

                    monitor = threading.Thread(target=sample, daemon=True)
                    conc_s, failed = run_together(count, worker, monitor.start)
                    errors.extend(failed)
                if client_processes:  # CPU seconds of the concurrent phase: server, this process, the clients
                    used = [
                        _cpu_s(pid) - c
                        for pid, c in zip((server.pid, os.getpid(), *(proc.pid for proc in procs)), cpu0, strict=True)
                    ]
                    cpu = {"server": round(used[0], 2), "bench": round(used[1], 2), "clients": round(sum(used[2:]), 2)}
                if not client_processes:
                    for split in splits:
                        for key, value in _pass_counts(joint_parts(split).stats).items():
                            client_passes[key] = client_passes.get(key, 0) + value
                sampling.set()
                monitor.join()
                for proc in procs:
                    proc.join(60)
                replayed: dict[str, Any] = {}
                if records is not None:
                    _progress(
                        f"all at once: {conc_s:.1f} s; replaying the trunk steps, one at a time then all at once ..."
                    )
                    replayed = replay_steps(sessions, records)
                    seq_replay, conc_replay = replayed.pop("replay_times")
                    replayed["replay_p50_step_ms"] = round(percentile(gaps(conc_replay), 0.5), 1)
                    replayed["replay_p99_step_ms"] = round(percentile(gaps(conc_replay), 0.99), 1)
                    replayed["replay_sequential_p50_step_ms"] = round(percentile(gaps(seq_replay), 0.5), 1)
                peak = _peak_rss(server.pid)
                time.sleep(0.5)  # the server logs its passes when the last stream has closed
                passes = [line.strip() for line in server.log.tail if "inference passes:" in line][-1:]
            finally:
                for client in sessions:
                    client.close()

    seq_gaps, conc_gaps = gaps(seq_times), gaps(conc_times)
    generated = count * new_tokens
    seq_tok_s, conc_tok_s = generated / seq_s, generated / conc_s
    return {
        "bench": "serve",
        "model": model,
        "device": "cpu",
        "clients": clients,
        "sessions": count,
        "prompt_tokens": [low, high],
        "new_tokens": new_tokens,
        "lora_rank": lora_rank,
        "joint_wait_ms": joint_wait_ms,
        "client_threads": torch.get_num_threads(),
        "client_processes": client_processes,
        "client_joint": client_joint,
        "server_threads": server_threads,
        "client_wait_ms": client_wait_ms,
        # Head and tail passes the clients ran all at once, and the calls they carried (calls / passes: the join).
        "client_passes": client_passes,
        "concurrent_cpu_s": cpu,  # with client processes: CPU seconds each side used all at once
        "sequential_s": round(seq_s, 2),
        "concurrent_s": round(conc_s, 2),
        "sequential_tok_s": round(seq_tok_s, 2),
        "concurrent_tok_s": round(conc_tok_s, 2),
        "multitenant_speedup": round(conc_tok_s / seq_tok_s, 2),
        "p50_token_ms": round(percentile(conc_gaps, 0.5), 1),
        "p99_token_ms": round(percentile(conc_gaps, 0.99), 1),
        "sequential_p50_token_ms": round(percentile(seq_gaps, 0.5), 1),
        "sequential_p99_token_ms": round(percentile(seq_gaps, 0.99), 1),
        "identical_to_alone": not errors and together == alone,
        "errors": errors[:3],
        "server_passes": passes[0].split("inference passes:")[-1].strip() if passes else "",
        "server_rss_loaded_mb": round(rss_loaded / 2**20, 1),
        "server_rss_warm_mb": round(rss_warm / 2**20, 1),
        "server_peak_rss_mb": round(peak / 2**20, 1),
        "cache_reserved_peak_mb": round(reserved_peak[0] / 2**20, 2),
        **replayed,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
