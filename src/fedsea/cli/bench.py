"""``fedsea bench load | train | generate | serve | federation | wire | plan | fuzz | soak``: one JSON line each.

BENCHMARKS.md describes the speed benchmarks, RELIABILITY.md the fuzz and soak benchmarks.

One subcommand per benchmark, so that each takes only the flags it uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

# Idle OpenMP threads spin this many iterations before sleeping (libgomp's default is 300,000,
# ~10 ms). The co-located benchmarks run client and server as two processes on the same cores:
# with the default, each side's idle threads steal the core the other side is computing on.
# 100,000 keeps the spin between one op and the next (HF generate alone is as fast) and ends
# it before the other process starts its half of a decode step.
_COLOCATED_SPINCOUNT = "100000"


def _reexec_for_colocation(args: argparse.Namespace) -> None:
    """Restart the command with GOMP_SPINCOUNT set (libgomp reads it once, when torch loads).

    Only for a real command line (``args.argv is None``) and when the user has not set the
    spin policy; the server process inherits the environment.
    """
    if args.argv is not None or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return
    env = dict(os.environ, GOMP_SPINCOUNT=_COLOCATED_SPINCOUNT)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "fedsea.cli", *sys.argv[1:]], env)


def _cmd_bench(args: argparse.Namespace) -> int:
    from fedsea.experiments import bench_train as bench

    if args.what == "load":
        result = bench.bench_load(args.model, repeats=args.repeats, device=args.device, dtype=args.dtype)
    elif args.what == "generate":
        from fedsea.experiments.bench_generate import bench_generate

        if args.net_latency_ms <= 0:
            raise ValueError("bench generate needs --net-latency-ms > 0: its round-trip limit is computed from it")
        _reexec_for_colocation(args)
        if args.speculative:
            from fedsea.experiments.bench_speculative import bench_speculative

            result = bench_speculative(
                args.model, args.prompts_per_task, args.new_tokens, args.prompt_tokens, args.head_layers,
                args.tail_layers, args.net_latency_ms, args.draft_tokens, args.speculative, args.wire_dtype,
                args.device, args.dtype, min_ngram=args.min_ngram,
            )  # fmt: skip
        else:
            result = bench_generate(
                args.model, args.prompt_tokens, args.new_tokens, tuple(args.batches), args.head_layers,
                args.tail_layers, args.naive_tokens, args.net_latency_ms, args.wire_dtype, args.device, args.dtype,
                args.rounds,
            )  # fmt: skip
    elif args.what == "serve":
        from fedsea.experiments.bench_serve import bench_serve

        _reexec_for_colocation(args)
        result = bench_serve(
            args.model, args.clients, args.sessions_each, tuple(args.prompt_tokens), args.new_tokens,
            args.head_layers, args.tail_layers, args.joint_wait_ms, args.lora_rank, args.client_processes,
            args.client_joint, args.server_threads, args.replay, args.client_wait_ms,
        )  # fmt: skip
    elif args.what == "wire":
        from fedsea.experiments.bench_wire import bench_wire

        result = bench_wire(
            tuple(args.sizes_mib), tuple(args.dtypes), args.repeats, args.device, args.chunk_kib[0] * 1024,
            args.compression, tuple(k * 1024 for k in args.chunk_kib[1:]),
        )  # fmt: skip
    elif args.what == "fuzz":
        from fedsea.experiments.bench_fuzz import bench_fuzz

        result = bench_fuzz(
            args.requests, args.seed, args.server, args.workers, args.deadline_s, token=args.token,
            good_token=args.good_token, serve_args=tuple(args.serve_args),
        )  # fmt: skip
    elif args.what == "soak":
        from fedsea.experiments.bench_soak import bench_soak

        result = bench_soak(args.clients, args.minutes, args.sample_s, tuple(args.serve_args))
    elif args.what == "plan":
        from fedsea.experiments.bench_plan import bench_plan

        _reexec_for_colocation(args)
        try:
            cuts = [tuple(int(x) for x in c.split(",")) for c in args.cuts]
        except ValueError:
            raise ValueError(f"--cuts takes P,Q pairs such as 2,2, got {' '.join(args.cuts)}") from None
        if any(len(c) != 2 for c in cuts):
            raise ValueError(f"--cuts takes P,Q pairs such as 2,2, got {' '.join(args.cuts)}")
        result = bench_plan(
            args.model, args.batch, args.tokens, [(c[0], c[1]) for c in cuts], tuple(args.latencies_ms), args.steps,
            args.repeats, args.device, args.dtype,
        )  # fmt: skip
    elif args.what == "wan":
        from fedsea.experiments.bench_wan import bench_wan

        result = bench_wan(args.model, args.latency_ms, args.new_tokens, args.batch, args.tokens, args.repeats)
    elif args.what == "federation":
        from fedsea.experiments.bench_federation import bench_federation

        engines = ("native", "flower") if args.engine == "both" else (args.engine,)
        result = bench_federation(
            tuple(args.parts), tuple(args.tasks), args.model, engines, args.run_file, tuple(args.overrides), args.keep
        )
    else:
        if max(args.micro_batches) > 1:  # client and server then compute at the same time
            _reexec_for_colocation(args)
        result = bench.bench_train(
            args.model, args.batch, args.tokens, args.head_layers, args.tail_layers, args.steps, args.warmup,
            args.wire_dtype, args.net_latency_ms, args.net_mbps or 0.0, args.device, args.dtype,
            tuple(args.micro_batches), args.wire_compression,
        )  # fmt: skip
    print(json.dumps(result))
    return 0


def add_bench_commands(sub: Any) -> None:
    """Register ``fedsea bench`` and its benchmarks on the ``fedsea`` parser."""
    from fedsea.cli.flags import add_settings_flags
    from fedsea.cli.generate import WIRE_FLAGS, wire_choices
    from fedsea.config import DTYPE_SPECS as BENCH_DTYPES
    from fedsea.config import SplitConfig, WireConfig
    from fedsea.experiments.constants import GENERATE_LATENCY_MS
    from fedsea.model.constants import DEFAULT_MODEL
    from fedsea.training.generation_config import GenerationConfig

    bench = sub.add_parser("bench", help="run a benchmark; prints one JSON line")
    kinds = bench.add_subparsers(dest="what", required=True)
    helps = {
        "load": "cached load times",
        "train": "a split training step over gRPC against a centralized one",
        "generate": "split generation over gRPC against Hugging Face generate",
        "federation": "the federation modes' speed and quality",
        "wire": "tensor codec over loopback gRPC against a raw-bytes ceiling (MB/s)",
        "wan": "the emulated WAN (NetShaper) against a TCP proxy delaying every byte: generation and a training step",
        "serve": "a multi-tenant trunk: concurrent sessions with their own adapters against one at a time",
        "plan": "fedsea plan's predicted step times against measured ones, per cut and emulated latency",
    }
    parsers = {}
    for what, text in helps.items():
        p = kinds.add_parser(what, help=text)
        if what != "wire":  # the wire bench sends random tensors: no model
            p.add_argument(
                "--model",
                default=DEFAULT_MODEL,
                help="model source, e.g. random:llama-2-7b?layers=4 for a published shape with random weights "
                "(default: %(default)s)",
            )
        p.add_argument("--json", action="store_true", help="(the output is always one JSON line)")
        p.set_defaults(func=_cmd_bench)
        parsers[what] = p
    wan = parsers["wan"]
    wan.add_argument("--latency-ms", type=float, default=GENERATE_LATENCY_MS, help="one-way ms (default: %(default)s)")
    wan.add_argument("--new-tokens", type=int, default=24, help="tokens generated per measure (default: %(default)s)")
    wan.add_argument("--batch", type=int, default=4, help="training batch (default: %(default)s)")
    wan.add_argument("--tokens", type=int, default=128, help="prompt and sequence length (default: %(default)s)")
    wan.add_argument("--repeats", type=int, default=3, help="measures of each, alternating (default: %(default)s)")
    _add_plan_flags(parsers["plan"])
    for what in ("load", "train", "generate", "plan"):
        p = parsers[what]
        p.add_argument(
            "--device", default="auto", help="where client and server run: auto (a GPU if any), cpu, cuda, cuda:1"
        )
        p.add_argument(
            "--dtype",
            default="auto",
            choices=list(BENCH_DTYPES),
            help="weights' dtype (default: auto, bfloat16 on CUDA, else float32)",
        )
    parsers["load"].add_argument("--repeats", type=int, default=3, help="cached loads to time")
    _add_wire_flags(parsers["wire"])
    _add_reliability_commands(kinds)
    train = parsers["train"]
    train.add_argument("--batch", type=int, default=4, help="sequences per step")
    train.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    add_settings_flags(train, SplitConfig())
    train.add_argument("--steps", type=int, default=8, help="timed steps (after --warmup)")
    train.add_argument("--warmup", type=int, default=2)
    train.add_argument(
        "--micro-batches", type=int, nargs="+", default=[1], help="micro-batches per step; several: one client each"
    )
    add_settings_flags(train, WireConfig(), flags=WIRE_FLAGS, choices=wire_choices())
    generate = parsers["generate"]
    generate.add_argument("--prompt-tokens", type=int, default=512, help="prompt length")
    generate.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt")
    generate.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    generate.add_argument("--naive-tokens", type=int, default=8, help="new tokens timed for the naive split")
    generate.add_argument(
        "--rounds", type=int, default=1, help="times split and generate run per batch; the last is reported as warm_*"
    )
    generate.add_argument(
        "--speculative", nargs="?", const="prompt-lookup", default=None, metavar="DRAFTER",
        help="instead: plain against speculative decoding (default drafter prompt-lookup; or bridge:FILE, "
        "a model source) on XSum and QuAC "
        "prompts, loopback and at --net-latency-ms (--prompt-tokens caps each input)",
    )  # fmt: skip
    generate.add_argument(
        "--draft-tokens", type=int, default=None,
        help="with --speculative: most draft tokens a step (default: 10 for prompt-lookup, 6 for a model or bridge)",
    )  # fmt: skip
    generate.add_argument("--prompts-per-task", type=int, default=3, help="with --speculative: prompts per task")
    generate.add_argument(
        "--min-ngram", type=int, default=GenerationConfig.prompt_lookup_min_ngram,
        help="with --speculative prompt-lookup: the shortest n-gram match that drafts (prompt_lookup_min_ngram)",
    )  # fmt: skip
    add_settings_flags(generate, SplitConfig())
    wire = WireConfig(latency_ms=GENERATE_LATENCY_MS)  # the round trip the generation figures assume
    add_settings_flags(generate, wire, ["dtype", "latency_ms"], flags=WIRE_FLAGS, choices=wire_choices())
    _add_serve_flags(parsers["serve"])
    federation = parsers["federation"]
    federation.add_argument(
        "--parts", nargs="+", default=["speed", "quality"], choices=["speed", "quality", "engines"],
        help="speed, quality and/or engines (one run file on each --engine, side by side)",
    )  # fmt: skip
    federation.add_argument(
        "--engine", default="native", choices=["native", "flower", "both"],
        help="the engine(s) of the quality and engines parts: fedsea's own coordinator, Flower's Simulation "
        "Engine, or both (default: %(default)s)",
    )  # fmt: skip
    federation.add_argument("--run-file", default=None, help="the engines part's run file (default: make demo's)")
    federation.add_argument("--keep", default=None, help="keep the engines part's run folders in DIR/<engine>")
    federation.add_argument(
        "--set", dest="overrides", action="append", default=[], help="the engines part's overrides: section.key=value"
    )
    federation.add_argument("--tasks", nargs="+", default=["sst2", "rte"], help="quality tasks")


def _add_plan_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    p.add_argument(
        "--cuts", nargs="+", default=["1,1", "2,2", "4,1", "1,4", "4,4", "6,2"], help="cuts measured, each P,Q"
    )
    p.add_argument("--latencies-ms", type=float, nargs="+", default=[0.0, 20.0, 100.0], help="one-way latencies")
    p.add_argument("--steps", type=int, default=3, help="timed steps per cut and latency (after one warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per profiled cut")


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    from fedsea.cli.flags import add_settings_flags
    from fedsea.config import SplitConfig

    p.add_argument("--clients", type=int, default=4, help="clients (tokens of their own)")
    p.add_argument("--sessions-each", type=int, default=4, help="generation sessions per client, each its own adapter")
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=[32, 128], help="shortest and longest prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens per session")
    p.add_argument("--joint-wait-ms", type=float, default=0.0, help="the server's joint_wait_ms")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of every session's trunk adapter")
    p.add_argument(
        "--client-processes", action="store_true", help="all at once: each client a process (default: threads)"
    )
    p.add_argument(
        "--client-joint",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each client joins its own sessions' head and tail passes (--no-client-joint: every call alone)",
    )
    p.add_argument(
        "--server-threads",
        type=int,
        default=None,
        help="the server's torch threads (OMP_NUM_THREADS; default: its own)",
    )
    p.add_argument(
        "--client-wait-ms",
        type=float,
        default=None,
        help="how long a client's pass waits for its other sessions' calls (default: JointParts' own, 40)",
    )
    p.add_argument(
        "--replay",
        action="store_true",
        help="also replay the recorded trunk steps without client compute: the server's own speedup (replay_speedup)",
    )
    add_settings_flags(p, SplitConfig())


def _add_wire_flags(p: argparse.ArgumentParser) -> None:
    from fedsea.config import WIRE_COMPRESSIONS, WIRE_DTYPES
    from fedsea.wire.constants import DEFAULT_CHUNK_BYTES

    p.add_argument("--sizes-mib", type=int, nargs="+", default=[16, 64], help="tensor sizes in MiB")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=WIRE_DTYPES, help="wire dtypes")
    p.add_argument("--repeats", type=int, default=15, help="timed transfers per path (median, best)")
    p.add_argument("--device", default="cpu", help="where the tensor starts and ends (cpu, cuda)")
    chunk = DEFAULT_CHUNK_BYTES // 1024
    p.add_argument(
        "--chunk-kib", type=int, nargs="+", default=[chunk], help="KiB per message; more sizes add tensor/raw paths"
    )
    p.add_argument("--compression", default=None, choices=list(WIRE_COMPRESSIONS), help="also time a lossy path")


def _add_reliability_commands(kinds: Any) -> None:
    """``fedsea bench fuzz`` and ``fedsea bench soak`` (RELIABILITY.md): the tiny model, a server subprocess."""
    fuzz = kinds.add_parser("fuzz", help="malformed requests on every RPC: statuses, crashes, hangs, server RSS")
    fuzz.add_argument("--requests", type=int, default=2000, help="malformed requests in all")
    fuzz.add_argument("--seed", type=int, default=0, help="the cases' seed (same seed, same cases)")
    fuzz.add_argument(
        "--server", default=None, help="fuzz this running server (tiny-llama) instead of starting fedsea serve"
    )
    fuzz.add_argument("--token", default=None, help="with --server: the fuzzing client's token")
    fuzz.add_argument("--good-token", default=None, help="with --server: the good client's token")
    fuzz.add_argument("--workers", type=int, default=4, help="concurrent fuzzing clients")
    fuzz.add_argument("--deadline-s", type=float, default=10.0, help="a request unanswered this long is a hang")
    soak = kinds.add_parser("soak", help="N clients training and generating for T minutes: errors, RSS over time")
    soak.add_argument("--clients", type=int, default=4, help="concurrent clients (threads)")
    soak.add_argument("--minutes", type=float, default=0.5, help="how long they run")
    soak.add_argument("--sample-s", type=float, default=10.0, help="seconds between RSS samples")
    for p in (fuzz, soak):
        p.add_argument(
            "--serve-arg", dest="serve_args", action="append", default=[],
            help="extra fedsea serve flag for the server subprocess (repeatable, e.g. --serve-arg=--max-batch=8)",
        )  # fmt: skip
        p.add_argument("--json", action="store_true", help="(the output is always one JSON line)")
        p.set_defaults(func=_cmd_bench)
