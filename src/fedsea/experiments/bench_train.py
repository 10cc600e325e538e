"""Benchmarks (``fedsea bench ...``): each prints one JSON line. Figures go to BENCHMARKS.md."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from fedsea.config import SplitConfig, WireConfig
from fedsea.model.device import resolve_wire_dtype
from fedsea.model.load import DEFAULT_MODEL, load_model
from fedsea.wire.ports import free_loopback_port


def bench_load(
    source: str = DEFAULT_MODEL, repeats: int = 3, device: str = "cpu", dtype: str = "float32"
) -> dict[str, Any]:
    """Time the first load of ``source`` into an empty cache (GGUF conversion) and cached loads.

    Target: a cached load under 2 s. A ``random:`` source has nothing to cache: each load builds it.
    """
    from fedsea.experiments.bench_server import bench_device, bench_dtype

    where = bench_device(device)
    torch_dtype = bench_dtype(dtype, where)
    dtype = str(torch_dtype).removeprefix("torch.")  # "auto" resolved, for the server and the JSON
    saved = os.environ.get("FEDSEA_CACHE")
    with tempfile.TemporaryDirectory(prefix="fedsea-bench-") as cache:
        os.environ["FEDSEA_CACHE"] = cache
        try:
            t0 = time.perf_counter()
            load_model(source, dtype=torch_dtype, device=where)
            first = time.perf_counter() - t0
            cached = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                load_model(source, dtype=torch_dtype, device=where)
                cached.append(time.perf_counter() - t0)
        finally:
            if saved is None:
                os.environ.pop("FEDSEA_CACHE", None)
            else:
                os.environ["FEDSEA_CACHE"] = saved
    return {
        "bench": "load",
        "source": source,
        "device": str(where),
        "dtype": dtype,
        "first_load_s": round(first, 3),
        "cached_load_s": round(statistics.median(cached), 3),
        "speedup": round(first / statistics.median(cached), 1),
        "target_cached_load_s": 2.0,
    }


def start_server_process(model: str, port: int, extra: list[str] | None = None) -> Any:
    """``fedsea serve`` in a subprocess on loopback; returns the Popen once it listens."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "fedsea.cli", "serve", "--model", model, "--port", str(port), *(extra or [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "listening on" in line:
            return proc
    raise RuntimeError("the trunk server did not start:\n" + "".join(seen))


def bench_train(
    model: str = DEFAULT_MODEL,
    batch: int = 4,
    tokens: int = 128,
    head_layers: int = SplitConfig.head_layers,
    tail_layers: int = SplitConfig.tail_layers,
    steps: int = 8,
    warmup: int = 2,
    wire_dtype: str = WireConfig.dtype,
    latency_ms: float = 0.0,
    mbps: float = 0.0,
    device: str = "cpu",
    dtype: str = "float32",
    micro_batches: Sequence[int] = (1,),
    wire_compression: str = WireConfig.compression,
) -> dict[str, Any]:
    """Median training-step time, split over loopback gRPC against centralized in-process.

    The server runs in its own process (``fedsea.experiments.bench_server``, ``fedsea serve``
    with a device and dtype); it, the client and the centralized model load the same ``model``
    on ``device`` in ``dtype`` (a ``random:`` source builds the same weights on each). Split and centralized steps
    alternate on the same batch so that both see the same machine state. Targets: ratio
    <= 1.15; bytes per step <= 1.02 x the theoretical 4 x B x n x d x wire-bytes.

    ``micro_batches``: one client (its own session) per count, their steps interleaved with
    the centralized one's; the top-level figures are the first count's, ``by_micro_batches``
    has each count's step time and ratio. ``wire_compression`` (int8, fp8: lossy) sends one
    byte per element, which the theoretical bytes then count.
    """
    from contextlib import ExitStack

    import torch

    from fedsea.client.split_client import SplitClient
    from fedsea.config import LoraSpec, OptimConfig
    from fedsea.experiments.bench_server import (
        bench_device,
        bench_dtype,
        start_bench_server,
        stop_server,
        synchronize,
    )
    from fedsea.model.split import split_model
    from fedsea.training.batch import make_batch
    from fedsea.training.step import CentralTrainer
    from fedsea.wire.shaper import NetShaper

    lora = LoraSpec(dropout=0.0)
    optim = OptimConfig(lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    where = bench_device(device)
    torch_dtype = bench_dtype(dtype, where)
    dtype = str(torch_dtype).removeprefix("torch.")  # "auto" resolved, for the server and the JSON
    port = free_loopback_port()
    wire_dtype = resolve_wire_dtype(wire_dtype, torch_dtype)
    server = start_bench_server(model, port, str(where), dtype)
    counts = list(micro_batches) or [1]
    try:
        client_splits = [
            split_model(load_model(model, torch_dtype, where), head_layers, tail_layers).add_lora(lora) for _ in counts
        ]
        central_split = split_model(load_model(model, torch_dtype, where), head_layers, tail_layers).add_lora(lora)
        client_split = client_splits[0]
        vocab = client_split.model.config.vocab_size
        data = make_batch(torch.randint(3, vocab, (batch, tokens), generator=gen).tolist(), pad_token_id=0)
        data = data.to(where)
        central = CentralTrainer(central_split, optim=optim)
        shaper = NetShaper(latency_ms, mbps)
        split_times: list[list[float]] = [[] for _ in counts]
        central_times: list[float] = []
        with ExitStack() as stack:
            clients = [
                stack.enter_context(
                    SplitClient(
                        f"127.0.0.1:{port}",
                        s,
                        optim=optim,
                        wire_dtype=wire_dtype,
                        shaper=shaper,
                        micro_batches=m,
                        wire_compression=wire_compression,
                    )
                )
                for s, m in zip(client_splits, counts, strict=True)
            ]
            client = clients[0]
            before = client.stats()
            for i in range(warmup + steps):
                for times, each in zip(split_times, clients, strict=True):
                    t0 = time.perf_counter()
                    each.train_step(data)
                    synchronize(where)
                    if i >= warmup:
                        times.append(time.perf_counter() - t0)
                t1 = time.perf_counter()
                central.train_step(data)
                synchronize(where)
                t2 = time.perf_counter()
                if i == warmup - 1:
                    before = client.stats()
                if i >= warmup:
                    central_times.append(t2 - t1)
            after = client.stats()
            itemsize = int(after["wire_itemsize"]) if wire_compression == "none" else 1
    finally:
        stop_server(server)

    def moved(stats: dict[str, Any]) -> int:
        rpcs = stats["rpcs"]
        return sum(
            rpcs.get(r, {}).get("bytes_sent", 0) + rpcs.get(r, {}).get("bytes_received", 0)
            for r in ("forward", "backward")
        )

    def seconds(stats: dict[str, Any], key: str) -> float:
        return float(sum(stats["rpcs"].get(r, {}).get(key, 0.0) for r in ("forward", "backward")))

    # Where a whole split step's time goes (first client's timed steps, means): the trunk's
    # compute as the server reports it, the rest of the RPCs' wall time (encode, gRPC, decode,
    # device copies), and the client's own head/tail compute and optimizer steps.
    server_s = (seconds(after, "compute_s") - seconds(before, "compute_s")) / steps
    rpc_rest_s = (seconds(after, "network_s") - seconds(before, "network_s")) / steps
    mean_split_s = statistics.fmean(split_times[0])
    breakdown = {
        "server_compute_s": round(server_s, 4),
        "wire_s": round(rpc_rest_s, 4),
        "client_s": round(mean_split_s - server_s - rpc_rest_s, 4),
    }
    hidden = int(client_split.model.config.hidden_size)
    bytes_per_step = (moved(after) - moved(before)) / steps
    theoretical = 4 * batch * tokens * hidden * itemsize
    split_s, central_s = statistics.median(split_times[0]), statistics.median(central_times)
    # The minimum too: on a shared machine it is the figure least disturbed by other load.
    by_count = {
        str(m): {
            "split_step_s": round(statistics.median(t), 4),
            "ratio": round(statistics.median(t) / central_s, 3),
            "split_step_min_s": round(min(t), 4),
        }
        for m, t in zip(counts, split_times, strict=True)
    }
    return {
        "bench": "train",
        "model": model,
        "device": str(where),
        "dtype": dtype,
        "batch": batch,
        "tokens": tokens,
        "head_layers": head_layers,
        "tail_layers": tail_layers,
        "wire_dtype": wire_dtype,
        "wire_compression": wire_compression,
        "net_latency_ms": latency_ms,
        "net_mbps": mbps,
        "steps": steps,
        "micro_batches": counts[0],
        "by_micro_batches": by_count,
        "split_step_s": round(split_s, 4),
        "central_step_s": round(central_s, 4),
        "central_step_min_s": round(min(central_times), 4),
        "ratio": round(split_s / central_s, 3),
        "split_step_breakdown": breakdown,
        "bytes_per_step": int(bytes_per_step),
        "theoretical_bytes_per_step": theoretical,
        "bytes_ratio": round(bytes_per_step / theoretical, 4),
        "target_ratio": 1.15,
        "target_bytes_ratio": 1.02,
    }
