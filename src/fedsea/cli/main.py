"""The ``fedsea`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from fedsea.config import Placement
from fedsea.errors import FedseaError
from fedsea.version import __version__
from fedsea.wire.memory import keep_freed_memory

# ``fedsea merge`` writes the merged weights in the model's dtype: float32 on the CPU unless told.
MERGE_PLACEMENT = Placement(device="cpu", dtype="float32")


def _cmd_demo(args: argparse.Namespace) -> int:
    from fedsea.experiments.demo import run_demo, run_split_demo
    from fedsea.model.load import DEFAULT_MODEL

    if not args.split_only:
        if args.prompt is not None or args.max_new_tokens is not None:
            raise ValueError("--prompt and --max-new-tokens answer a prompt: give them with --split-only")
        # The flags given become overrides of the demo's run file (every client's split).
        given = {"model.source": args.model, "client.head_layers": args.head_layers}
        given["client.tail_layers"] = args.tail_layers
        overrides = (*args.set, *(f"{key}={json.dumps(v)}" for key, v in given.items() if v is not None))
        run_demo(overrides, args.run_dir)
        return 0
    if args.set or args.run_dir:
        raise ValueError("run-file overrides and --run-dir are for the federated demo, not --split-only")
    from fedsea.cli.flags import settings_from_flags
    from fedsea.config import SplitConfig
    from fedsea.experiments.demo import DEFAULT_PROMPT, SPLIT_DEMO_NEW_TOKENS

    split = settings_from_flags(args, SplitConfig())
    model = args.model or DEFAULT_MODEL
    prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    tokens = args.max_new_tokens if args.max_new_tokens is not None else SPLIT_DEMO_NEW_TOKENS
    result = run_split_demo(model, split.head_layers, split.tail_layers, prompt, tokens)
    return 0 if result.identical else 1


def _cmd_info(args: argparse.Namespace) -> int:
    from fedsea.model.families import family_of, layer_types
    from fedsea.model.load import load_model, resolve_source
    from fedsea.model.split import partition_range

    resolved = resolve_source(args.model)
    if resolved.kind == "random":
        # A published shape needs no weights to describe: built on the meta device, a 70B shape
        # is described in a second without its 140 GB.
        import torch
        from transformers import AutoModelForCausalLM

        from fedsea.model.synthetic import parse_random_source, random_config

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(random_config(parse_random_source(resolved.location)))
    else:
        model = load_model(args.model)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    family = family_of(model)
    kinds = layer_types(cfg)
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
        "parameters": params,
        # Capacity planning: the weights alone, per dtype (activations, KV caches and LoRA come on top).
        "weights_gib": {"float32": round(params * 4 / 2**30, 2), "bfloat16": round(params * 2 / 2**30, 2)},
        "family": family.name,
        "family_notes": family.notes,
        "sliding_window_layers": [i for i, kind in enumerate(kinds) if kind == "sliding_attention"],
        "partition": partition_range(int(cfg.num_hidden_layers)),
    }
    print(json.dumps(info, indent=2))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from fedsea.cli.eval import saved_partition
    from fedsea.cli.flags import settings_from_flags
    from fedsea.federation.run_adapters import run_source
    from fedsea.model.constants import DEFAULT_MODEL
    from fedsea.model.load import load_model, load_tokenizer
    from fedsea.model.split import split_model

    where = settings_from_flags(args, MERGE_PLACEMENT)
    if run_source(args.adapters) is not None:  # a run folder or round checkpoint: fedsea export's merge
        return _merge_run(args, where)
    model = load_model(args.model or DEFAULT_MODEL, where.dtype, where.device)
    # The cut the adapters were saved with (their head/ and tail/ record it); flags only where they do not.
    saved_p, saved_q = saved_partition(args.adapters, int(model.config.num_hidden_layers))
    p, q = args.head_layers or saved_p, args.tail_layers or saved_q
    if p is None or q is None:
        raise ValueError(
            f"{args.adapters} has no head/ or tail/ adapter to read the cut from: give --head-layers and --tail-layers"
        )
    split = split_model(model, p, q)
    split.load_adapters(args.adapters)
    out = split.export(args.out, load_tokenizer(args.model or DEFAULT_MODEL))
    print(f"wrote a merged Hugging Face checkpoint to {out}")
    return 0


def _merge_run(args: argparse.Namespace, where: Any) -> int:
    """``fedsea merge RUN OUT``: the run's global adapter (every block's LoRA, whatever the cut) into
    its base model, with the run's model card: what ``fedsea export`` writes."""
    from fedsea.federation.run_adapters import run_source
    from fedsea.federation.simconfig import load_plan
    from fedsea.federation.simulate import export_run

    source = run_source(args.adapters)
    assert source is not None
    run_model = load_plan(source[0] / "config.toml").model
    if args.model is not None and args.model != run_model:
        raise ValueError(f"{args.adapters} was trained on {run_model}: drop --model {args.model}")
    if args.head_layers is not None or args.tail_layers is not None:
        raise ValueError("a run's global adapter holds every block's LoRA: drop --head-layers/--tail-layers")
    out = export_run(args.adapters, args.out, where)
    print(f"wrote a merged Hugging Face checkpoint to {out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fedsea.cli.eval import run_eval

    return run_eval(args)


def build_parser() -> argparse.ArgumentParser:
    """The ``fedsea`` parser with every subcommand."""
    from fedsea.cli.flags import add_settings_flags
    from fedsea.config import DTYPE_SPECS, SplitConfig
    from fedsea.experiments.constants import SPLIT_DEMO_NEW_TOKENS
    from fedsea.model.constants import DEFAULT_MODEL

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
    demo.add_argument("--model", default=None, help=f"model source (default: the run file's; {DEFAULT_MODEL})")
    add_settings_flags(demo, SplitConfig(), keep="the demo run file's; with --split-only, {default}")
    demo.add_argument("--prompt", default=None, help="with --split-only: the user message")
    demo.add_argument(
        "--max-new-tokens", type=int, default=None, help=f"with --split-only (default: {SPLIT_DEMO_NEW_TOKENS})"
    )
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser("info", help="load a model and print what fedsea sees")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    info.set_defaults(func=_cmd_info)

    merge = sub.add_parser("merge", help="merge saved head/trunk/tail adapters into a Hugging Face checkpoint")
    merge.add_argument(
        "adapters", help="folder with head/, trunk/ and tail/ adapter folders, or a run folder or round checkpoint"
    )
    merge.add_argument("out", help="output folder")
    merge.add_argument("--model", help=f"base model (default: a run's own, else {DEFAULT_MODEL})")
    merge.add_argument("--head-layers", type=int, help="p (default: what the adapters' head/ records)")
    merge.add_argument("--tail-layers", type=int, help="q (default: what the adapters' tail/ records)")
    add_settings_flags(merge, MERGE_PLACEMENT, choices={"dtype": DTYPE_SPECS})
    merge.set_defaults(func=_cmd_merge)

    from fedsea.cli.wire import add_wire_commands

    add_wire_commands(sub)
    from fedsea.cli.generate import add_generate_commands

    add_generate_commands(sub)
    from fedsea.cli.fed import add_fed_commands

    add_fed_commands(sub)
    from fedsea.cli.flower import add_flower_commands

    add_flower_commands(sub)
    from fedsea.cli.attack import add_attack_commands

    add_attack_commands(sub)
    from fedsea.cli.reports import add_report_commands

    add_report_commands(sub)
    from fedsea.cli.config import add_config_commands

    add_config_commands(sub)
    from fedsea.cli.openai_cmd import add_openai_command

    add_openai_command(sub)
    from fedsea.cli.bridge import add_bridge_commands

    add_bridge_commands(sub)
    from fedsea.cli.plan import add_plan_commands

    add_plan_commands(sub)

    from fedsea.cli.bench import add_bench_commands

    add_bench_commands(sub)

    ev = sub.add_parser("eval", help="evaluate a model, or a split with adapters, on a task; prints a table and JSON")
    ev.add_argument("--task", required=True, help="sst2, boolq, cb, copa, rte, wic, wsc, multirc, record, xsum, ...")
    ev.add_argument("--model", default=DEFAULT_MODEL, help="model source (default: %(default)s)")
    add_settings_flags(ev, Placement(), choices={"dtype": DTYPE_SPECS})
    ev.add_argument(
        "--adapter",
        default=None,
        help="folder of saved head/, trunk/, tail/ adapters, or a run folder or round checkpoint of fedsea simulate",
    )
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
    show_defaults(parser)
    return parser


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Name every flag's default in ``--help`` where its help text does not already say it.

    ``argparse.ArgumentDefaultsHelpFormatter`` would repeat the defaults that the help texts
    already give in their own words, and skips flags without help text; this walks every
    subcommand's flags once instead.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                show_defaults(child)
            continue
        default = action.default
        if (
            not action.option_strings
            or default in (None, False, [], argparse.SUPPRESS)
            or action.help == argparse.SUPPRESS
        ):
            continue
        if action.help is None:
            action.help = "(default: %(default)s)"
        elif "default" not in action.help.lower():
            action.help += " (default: %(default)s)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedsea`` command; returns its exit status (2 with a one-line error for bad input)."""
    args = build_parser().parse_args(argv)
    args.argv = argv
    keep_freed_memory()  # tensors cross the wire through fresh buffers (fedsea.wire.memory)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except (FedseaError, ValueError, FileNotFoundError) as exc:
        print(f"fedsea: error: {exc}", file=sys.stderr)
        return 2
