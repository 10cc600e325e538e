"""The ``fedsea`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from fedsea.errors import FedseaError
from fedsea.version import __version__


def _cmd_demo(args: argparse.Namespace) -> int:
    from fedsea.experiments.demo import run_demo, run_split_demo
    from fedsea.model.load import DEFAULT_MODEL

    if not args.split_only:
        overrides = (*args.set, *([f'model.source="{args.model}"'] if args.model else []))
        run_demo(overrides, args.run_dir)
        return 0
    model = args.model or DEFAULT_MODEL
    result = run_split_demo(model, args.head_layers, args.tail_layers, args.prompt, args.max_new_tokens)
    return 0 if result.identical else 1


def _cmd_info(args: argparse.Namespace) -> int:
    from fedsea.model.load import load_model, resolve_source

    resolved = resolve_source(args.model)
    model = load_model(args.model)
    cfg = model.config
    info = {
        "source": args.model,
        "kind": resolved.kind,
        "location": resolved.location,
        "architecture": type(model).__name__,
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_attention_heads,
        "num_kv_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    print(json.dumps(info, indent=2))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from fedsea.model.load import load_model, load_tokenizer
    from fedsea.model.split import split_model

    split = split_model(load_model(args.model), args.head_layers, args.tail_layers)
    split.load_adapters(args.adapters)
    out = split.export(args.out, load_tokenizer(args.model))
    print(f"wrote a merged Hugging Face checkpoint to {out}")
    return 0


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

    if args.what == "generate":
        _reexec_for_colocation(args)
    if args.what == "load":
        result = bench.bench_load(args.model, repeats=args.repeats)
    elif args.what == "generate":
        from fedsea.experiments.bench_generate import bench_generate

        result = bench_generate(
            args.model, args.prompt_tokens, args.new_tokens, tuple(args.batches), args.head_layers, args.tail_layers,
            args.naive_tokens, args.net_latency_ms or 25.0, args.wire_dtype,
        )  # fmt: skip
    elif args.what == "federation":
        from fedsea.experiments.bench_federation import bench_federation

        result = bench_federation(tuple(args.parts), tuple(args.tasks), args.model)
    elif args.what == "train":
        result = bench.bench_train(
            args.model, args.batch, args.tokens, args.head_layers, args.tail_layers, args.steps, args.warmup,
            args.wire_dtype, args.net_latency_ms, args.net_mbps,
        )  # fmt: skip
    print(json.dumps(result))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fedsea.cli.eval import run_eval

    return run_eval(args)


def build_parser() -> argparse.ArgumentParser:
    from fedsea.model.load import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="fedsea", description="Federated split fine-tuning of LLaMA-family models.")
    parser.add_argument("--version", action="version", version=f"fedsea {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="the main job: 3 clients fine-tune the default model federated (or --split-only)"
    )
    demo.add_argument("--split-only", action="store_true", help="only split the model and answer a prompt through it")
    demo.add_argument("--run-dir", help="run folder of the federated demo")
    demo.add_argument("set", nargs="*", help="overrides of the demo's run file: section.key=value")
    demo.add_argument("--model", default=None, help=f"model source (default: {DEFAULT_MODEL})")
    demo.add_argument("--head-layers", type=int, default=2, help="p, blocks on the client before the trunk")
    demo.add_argument("--tail-layers", type=int, default=2, help="q, blocks on the client after the trunk")
    demo.add_argument("--prompt", default=None, help="the user message")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser("info", help="load a model and print what fedsea sees")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    info.set_defaults(func=_cmd_info)

    merge = sub.add_parser("merge", help="merge saved head/trunk/tail adapters into a Hugging Face checkpoint")
    merge.add_argument("adapters", help="folder with head/, trunk/ and tail/ adapter folders")
    merge.add_argument("out", help="output folder")
    merge.add_argument("--model", default=DEFAULT_MODEL)
    merge.add_argument("--head-layers", type=int, required=True)
    merge.add_argument("--tail-layers", type=int, required=True)
    merge.set_defaults(func=_cmd_merge)

    from fedsea.cli.wire import add_wire_commands

    add_wire_commands(sub)
    from fedsea.cli.generate import add_generate_commands

    add_generate_commands(sub)
    from fedsea.cli.fed import add_fed_commands

    add_fed_commands(sub)
    from fedsea.cli.attack import add_attack_commands

    add_attack_commands(sub)
    from fedsea.cli.reports import add_report_commands

    add_report_commands(sub)

    bench = sub.add_parser("bench", help="run a benchmark; prints one JSON line")
    bench.add_argument(
        "what",
        choices=["load", "train", "generate", "federation"],
        help="load: cached load times; train: split step over gRPC vs centralized; generate: split generation",
    )
    bench.add_argument("--model", default=DEFAULT_MODEL)
    bench.add_argument("--repeats", type=int, default=3, help="load: cached loads to time")
    bench.add_argument("--batch", type=int, default=4, help="train: sequences per step")
    bench.add_argument("--tokens", type=int, default=128, help="train: tokens per sequence")
    bench.add_argument("--head-layers", type=int, default=2)
    bench.add_argument("--tail-layers", type=int, default=2)
    bench.add_argument("--steps", type=int, default=8, help="train: timed steps (after --warmup)")
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--wire-dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    bench.add_argument("--net-latency-ms", type=float, default=0.0)
    bench.add_argument("--net-mbps", type=float, default=0.0)
    bench.add_argument("--prompt-tokens", type=int, default=512, help="generate: prompt length")
    bench.add_argument("--new-tokens", type=int, default=64, help="generate: new tokens per prompt")
    bench.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="generate: batch sizes")
    bench.add_argument("--naive-tokens", type=int, default=8, help="generate: new tokens timed for the naive split")
    bench.add_argument("--parts", nargs="+", default=["speed", "quality"], help="federation: speed and/or quality")
    bench.add_argument("--tasks", nargs="+", default=["sst2", "rte"], help="federation: quality tasks")
    bench.add_argument("--json", action="store_true", help="(the output is always one JSON line)")
    bench.set_defaults(func=_cmd_bench)

    ev = sub.add_parser("eval", help="evaluate a model, or a split with adapters, on a task; prints a table and JSON")
    ev.add_argument("--task", required=True, help="sst2, boolq, cb, copa, rte, wic, wsc, multirc, record, xsum, ...")
    ev.add_argument("--model", default=DEFAULT_MODEL, help="model source (default: %(default)s)")
    ev.add_argument("--adapter", default=None, help="folder of saved head/, trunk/, tail/ adapters")
    ev.add_argument("--head-layers", type=int, default=None, help="P (default: the adapter's)")
    ev.add_argument("--tail-layers", type=int, default=None, help="Q (default: the adapter's)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    ev.add_argument("--split", default=None, help="data split (default: the task's evaluation split)")
    ev.add_argument("--data", default=None, help="a data file, 'hf', or 'hf:<path>[:<config>]' (default: local)")
    ev.add_argument("--data-dir", default=None, help="local data folder (default: $FEDSEA_DATA, ../shared/datasets)")
    ev.add_argument("--max-tokens", type=int, default=4096, help="token budget of one batch")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (default: the task's)")
    ev.add_argument("--predictions", action="store_true", help="include each prediction in the JSON")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("--json", action="store_true", help="print only the JSON result")
    ev.set_defaults(func=_cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if getattr(args, "prompt", "") is None:
        from fedsea.experiments.demo import DEFAULT_PROMPT

        args.prompt = DEFAULT_PROMPT
    try:
        return int(args.func(args))
    except (FedseaError, ValueError, FileNotFoundError) as exc:
        print(f"fedsea: error: {exc}", file=sys.stderr)
        return 2
