"""Where the split's time goes on one device, in one process: the trunk server's steps without gRPC.

Issue 13's GPU targets compare a split step (client and trunk server as two processes) with the
centralized one. ``fedsea bench train|generate`` measure the whole; this script takes the
server's own work apart, in one process and on one CUDA context, so that what is left over in
the benchmarks is the environment's (the wire, two processes sharing a GPU, the gRPC threads):

- train: the centralized step (``CentralTrainer``), the same trunk blocks' forward + backward +
  LoRA step alone (what the server's compute should cost), and ``TrunkHost.forward/backward`` on
  host tensors (what the server does per step: checks, copies, the activation meter), with one
  variant per suspect switched off; a ``torch.profiler`` table of one host step.
- generate: Hugging Face ``generate`` per new token, the trunk blocks alone per decode step with a
  KV cache, and ``GenerationHost.step`` per decode step; a profiler table of a few host steps.

Prints one JSON line per measurement; profiler tables go to ``--out``.

Usage: python scripts/gpu_profile.py [--model random:llama-2-7b] [--device cuda] [--dtype bfloat16]
           [--out DIR] [--parts train generate]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fedsea.config import LoraSpec, OptimConfig
from fedsea.model.load import load_model
from fedsea.model.split import split_model


def emit(**row: Any) -> None:
    """One JSON line on stdout."""
    print(json.dumps(row), flush=True)


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup``, the device drained around each."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_table(fn: Callable[[], Any], device: torch.device, path: Path, rows: int = 30) -> None:
    """One ``torch.profiler`` run of ``fn``: tables by self CPU and self device time, written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    events = prof.key_averages()
    text = ["# by self CPU time", events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70)]
    if device.type == "cuda":
        by_cuda = events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70)
        text += ["# by self CUDA time", by_cuda]
    names = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
    launches = sum(e.count for e in events if e.key in names)
    text.append(f"# kernel launches: {launches}")
    path.write_text("\n".join(text))
    emit(profile=str(path), kernel_launches=launches)


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.name`` set to ``value`` inside the block."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def part_train(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, out: Path) -> None:
    """Centralized step, the trunk's blocks alone, and ``TrunkHost`` steps with each suspect off."""
    import fedsea.server.trunk as trunk_mod
    import fedsea.training.pipeline as pipeline_mod
    from fedsea.server.trunk import SessionSpec, TrunkHost
    from fedsea.training.batch import make_batch
    from fedsea.training.step import CentralTrainer, PartOptimizer
    from fedsea.wire.tensors import WIRE_DTYPES

    lora, optim = LoraSpec(dropout=0.0), OptimConfig(lr=1e-4)
    p, q, b, n = args.head_layers, args.tail_layers, args.batch, args.tokens
    gen = torch.Generator().manual_seed(0)

    central_model = load_model(args.model, dtype, device)
    split = split_model(central_model, p, q).add_lora(lora)
    vocab, d = int(central_model.config.vocab_size), int(central_model.config.hidden_size)
    data = make_batch(torch.randint(3, vocab, (b, n), generator=gen).tolist(), pad_token_id=0).to(device)
    central = CentralTrainer(split, optim=optim)
    central_s = timed(lambda: central.train_step(data), device, args.repeats, warmup=2)

    # The trunk blocks alone, as LocalTrunk runs them: what the server's compute should cost.
    trunk, trunk_opt = split.trunk, PartOptimizer(split.trunk, optim)
    lengths = torch.full((b,), n, dtype=torch.int64)
    h_dev = torch.randn(b, n, d, generator=gen).to(device=device, dtype=dtype)
    g_dev = (torch.randn(b, n, d, generator=gen) * 1e-3).to(device=device, dtype=dtype)

    def bare() -> None:
        split.model.train()
        inp = h_dev.detach().requires_grad_(True)
        trunk(inp, lengths).backward(g_dev)
        trunk_opt.step()

    bare_s = timed(bare, device, args.repeats, warmup=2)
    blocks = f"[{p}, {central_model.config.num_hidden_layers - q})"
    emit(
        part="train",
        central_step_s=round(central_s, 4),
        trunk_blocks_s=round(bare_s, 4),
        trunk_share_of_central=round(bare_s / central_s, 3),
        blocks=blocks,
    )
    central_model.to("meta")  # its 13 GB go before the server's copy is built
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # The server's host: host tensors in and out, as the gRPC service hands them over.
    model = load_model(args.model, dtype, device)
    host = TrunkHost(model)
    wire = WIRE_DTYPES["bf16" if dtype == torch.bfloat16 else "fp16" if dtype == torch.float16 else "fp32"]
    spec = SessionSpec(head_layers=p, tail_layers=q, lora=lora, optim=optim, wire_dtype=wire, seed=0)
    session = host.open_session("bench", host.fingerprint, spec)
    h_cpu, g_cpu = h_dev.cpu(), g_dev.cpu()
    step = [0]

    def host_step() -> None:
        host.forward("bench", session.id, step[0], h_cpu, lengths)
        host.backward("bench", session.id, step[0], g_cpu, update=True)
        step[0] += 1

    results = {"host_step_s": timed(host_step, device, args.repeats, warmup=2)}

    def no_check(tensor: torch.Tensor, field: str) -> None:
        return None

    with patched(trunk_mod, "check_finite", no_check), patched(pipeline_mod, "check_finite", no_check):
        results["host_step_no_finite_check_s"] = timed(host_step, device, args.repeats)

    class NoMeter:
        bytes = 0

    @contextlib.contextmanager
    def no_measure(blocks: tuple[int, int], tokens: int) -> Iterator[NoMeter]:
        yield NoMeter()

    with patched(host.activations, "measure", no_measure):
        results["host_step_no_meter_s"] = timed(host_step, device, args.repeats)

    def host_step_device_io() -> None:  # no host <-> device copies: device tensors in, the output left there
        host.forward("bench", session.id, step[0], h_dev, lengths)
        host.backward("bench", session.id, step[0], g_dev, update=True)
        step[0] += 1

    results["host_step_device_tensors_s"] = timed(host_step_device_io, device, args.repeats)
    over = round(results["host_step_s"] / bare_s, 3)
    emit(part="train", **{k: round(v, 4) for k, v in results.items()}, host_over_blocks=over)
    profile_table(host_step, device, out / "train_host_step.txt")
    host.close_session("bench", session.id)
    model.to("meta")
    if device.type == "cuda":
        torch.cuda.empty_cache()


def part_generate(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, out: Path) -> None:
    """Per batch size: ``generate``, the trunk's blocks and ``GenerationHost`` per decode step."""
    from fedsea.server.generation import GenerationHost
    from fedsea.server.trunk import SessionSpec, TrunkHost
    from fedsea.wire.tensors import WIRE_DTYPES

    p, q = args.head_layers, args.tail_layers
    gen = torch.Generator().manual_seed(0)
    model = load_model(args.model, dtype, device)
    host = TrunkHost(model)
    wire = WIRE_DTYPES["bf16" if dtype == torch.bfloat16 else "fp16" if dtype == torch.float16 else "fp32"]
    lora = LoraSpec(dropout=0.0)
    spec = SessionSpec(head_layers=p, tail_layers=q, lora=lora, optim=OptimConfig(), wire_dtype=wire, seed=0)
    session = host.open_session("bench", host.fingerprint, spec)
    gens = GenerationHost(host)

    for batch in args.batches:
        _generate_batch(args, device, dtype, out, host, session, gens, batch, gen)


def _generate_batch(
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    out: Path,
    host: Any,
    session: Any,
    gens: Any,
    batch: int,
    gen: torch.Generator,
) -> None:
    """One batch size: ``generate`` per token, the trunk's blocks per decode step, ``GenerationHost.step``."""
    from transformers import DynamicCache

    model = host.model
    n, new = args.prompt_tokens, args.new_tokens
    vocab, d = int(model.config.vocab_size), int(model.config.hidden_size)
    ids = torch.randint(3, vocab, (batch, n), generator=gen).to(device)
    # HF generate on the same model with the session's adapter active (peft: one adapter at a time).
    with host.computing(session, training=False), torch.no_grad():

        def hf(tokens: int) -> float:
            t0 = time.perf_counter()
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            sync(device)
            return time.perf_counter() - t0

        first_full = hf(new)
        warm_full, warm_prefill = hf(new), hf(1)
    hf_ms = 1000 * (warm_full - warm_prefill) / (new - 1)

    # The trunk blocks alone per decode step, with a cache (device tensors, no checks, no copies).
    trunk = session.trunk
    prompt = torch.randn(batch, n, d, generator=gen).to(device=device, dtype=dtype)
    token = torch.randn(batch, 1, d, generator=gen).to(device=device, dtype=dtype)

    def bare_decode() -> float:
        with host.computing(session, training=False), torch.no_grad():
            cache: DynamicCache = trunk.new_cache()
            trunk(prompt, torch.full((batch,), n), cache=cache)
            sync(device)
            t0 = time.perf_counter()
            for i in range(1, new):
                trunk(token, torch.full((batch,), n + i), cache=cache)
            sync(device)
            return 1000 * (time.perf_counter() - t0) / (new - 1)

    bare_decode()
    bare_ms = bare_decode()

    # The server's GenerationHost: host tensors in, host tensors out (what the service calls).
    prompt_cpu, token_cpu = prompt.cpu(), token.cpu()

    def host_decode(steps: int = new) -> float:
        stream = gens.open("bench", session.id, n + steps, naive=False)
        gens.step(stream, 0, prompt_cpu, [n] * batch, [])
        t0 = time.perf_counter()
        for i in range(1, steps):
            gens.step(stream, i, token_cpu, [], [])
        seconds = time.perf_counter() - t0
        gens.close(stream)
        return 1000 * seconds / (steps - 1)

    host_first = host_decode()
    host_ms = host_decode()
    emit(
        part="generate",
        batch=batch,
        hf_generate_ms_per_token=round(hf_ms, 2),
        hf_first_request_s=round(first_full, 3),
        hf_warm_request_s=round(warm_full, 3),
        trunk_blocks_ms_per_step=round(bare_ms, 2),
        host_ms_per_step=round(host_ms, 2),
        host_first_ms_per_step=round(host_first, 2),
        trunk_share_of_hf=round(bare_ms / hf_ms, 3),
        host_over_blocks=round(host_ms / bare_ms, 3),
    )
    profile_table(lambda: host_decode(8), device, out / f"generate_host_b{batch}.txt")

    def bare8() -> None:
        with host.computing(session, training=False), torch.no_grad():
            cache = trunk.new_cache()
            trunk(prompt, torch.full((batch,), n), cache=cache)
            for i in range(1, 8):
                trunk(token, torch.full((batch,), n + i), cache=cache)

    profile_table(bare8, device, out / f"generate_blocks_b{batch}.txt")


def main() -> int:
    """Run the parts asked for; 1 if one failed (the others still ran)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default="profile-out")
    parser.add_argument("--parts", nargs="+", default=["train", "generate"], choices=["train", "generate"])
    parser.add_argument("--head-layers", type=int, default=2)
    parser.add_argument("--tail-layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    from fedsea.experiments.bench_server import bench_device, bench_dtype

    device = bench_device(args.device)
    dtype = bench_dtype(args.dtype, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit(
        torch=torch.__version__,
        device=str(device),
        dtype=str(dtype),
        model=args.model,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    )
    failed = []
    for part, fn in (("train", part_train), ("generate", part_generate)):
        if part not in args.parts:
            continue
        t0 = time.perf_counter()
        try:
            fn(args, device, dtype, out)
        except Exception:  # one part failing must not cost the other's figures
            traceback.print_exc()
            failed.append(part)
        emit(part=part, seconds=round(time.perf_counter() - t0, 1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
