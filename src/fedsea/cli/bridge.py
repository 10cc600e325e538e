"""``fedsea bridge train``: make the bridge file of the self-speculative drafter (``--speculative bridge:FILE``).

Module import is light (argparse only): torch and transformers load in the command's function,
so that ``fedsea --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from typing import Any

# Kept here, not imported from fedsea.training.bridge_train (which imports torch), so that
# parsing stays light; a unit test checks they agree.
STEPS, BATCH, SEQ_LEN, LR, CE_FRACTION, LAYERS, DRAFT_VOCAB = 600, 4, 256, 1e-3, 0.25, 1, 8192
TASKS = "xsum,quac"
EXAMPLES_PER_TASK = 300
EVAL_WINDOWS = 12


def add_bridge_commands(sub: Any) -> None:
    """Register ``bridge train`` on the ``fedsea`` subparsers."""
    from fedsea.cli.flags import add_settings_flags
    from fedsea.config import DTYPE_SPECS, Placement, SplitConfig
    from fedsea.model.constants import DEFAULT_MODEL

    bridge = sub.add_parser(
        "bridge",
        help="the bridge of the self-speculative drafter: a small stand-in for the trunk, trained once per "
        "model and cut on public text",
    )
    commands = bridge.add_subparsers(dest="bridge_command", required=True)
    train = commands.add_parser(
        "train",
        help="distil a bridge from the whole (public) model; use it with --speculative bridge:FILE",
        description="Runs the whole model on public text once and fits a bridge (a linear map and a decoder "
        "block) that guesses the trunk's output from the head's output and the last trunk output, so a "
        "client drafts tokens with its own head and tail. Needs the whole base model, not the client's data.",
    )
    train.add_argument("--model", default=DEFAULT_MODEL, help="model source (default: %(default)s)")
    train.add_argument("--head-layers", type=int, default=SplitConfig.head_layers, help="p of the cut it serves")
    train.add_argument("--tail-layers", type=int, default=SplitConfig.tail_layers, help="q of the cut it serves")
    train.add_argument("--out", required=True, help="the bridge file to write (.safetensors)")
    train.add_argument("--tasks", default=TASKS, help="comma-separated tasks whose train split is the text")
    train.add_argument("--data-dir", default=None, help="local data folder (default: $FEDSEA_DATA, ../shared/datasets)")
    train.add_argument("--examples", type=int, default=EXAMPLES_PER_TASK, help="examples of each task")
    train.add_argument("--steps", type=int, default=STEPS, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=BATCH, help="windows a step")
    train.add_argument("--seq-len", type=int, default=SEQ_LEN, help="tokens a window (each example's last ones)")
    train.add_argument("--lr", type=float, default=LR, help="peak learning rate (AdamW, warm-up, cosine)")
    train.add_argument("--layers", type=int, default=LAYERS, help="decoder blocks of the bridge")
    train.add_argument("--ce-fraction", type=float, default=CE_FRACTION, help="positions a step scored by the LM head")
    train.add_argument(
        "--draft-vocab", type=int, default=DRAFT_VOCAB,
        help="draft among the N tokens the model chose most often on the text (0: the whole vocabulary); "
        "the LM head's cost per draft token falls with N",
    )  # fmt: skip
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_settings_flags(train, Placement(), choices={"dtype": DTYPE_SPECS})
    train.set_defaults(func=_cmd_train)


def chat_texts(tokenizer: Any, tasks: Iterable[str], limit: int | None, data_dir: str | None = None) -> list[str]:
    """Training examples of ``tasks`` (their train split) as chat-formatted user prompt + answer."""
    from fedsea.tasks import get_task

    texts = []
    for name in tasks:
        examples, _ = get_task(name).examples(split="train", data_dir=data_dir, limit=limit)
        for example in examples:
            messages = [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.target}]
            if getattr(tokenizer, "chat_template", None) is not None:
                texts.append(str(tokenizer.apply_chat_template(messages, tokenize=False)))
            else:
                texts.append(f"{example.prompt}\n{example.target}")
    return texts


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from fedsea.cli.flags import settings_from_flags
    from fedsea.config import Placement
    from fedsea.model.load import load_model, load_tokenizer
    from fedsea.model.split import check_partition
    from fedsea.training.bridge import save_bridge
    from fedsea.training.bridge_train import token_windows, train_bridge

    placement = settings_from_flags(args, Placement())
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out}: a bridge file ends in .safetensors")
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise ValueError("--tasks is empty: name at least one task (e.g. xsum)")
    t0 = time.perf_counter()
    model = load_model(args.model, placement.dtype, placement.device)
    check_partition(int(model.config.num_hidden_layers), args.head_layers, args.tail_layers)
    tokenizer = load_tokenizer(args.model)
    windows = token_windows(tokenizer, chat_texts(tokenizer, tasks, args.examples, args.data_dir), args.seq_len)
    held = min(EVAL_WINDOWS, max(1, windows.shape[0] // 10))
    if windows.shape[0] <= held:
        raise ValueError(f"only {windows.shape[0]} windows of {args.seq_len} tokens: give more --examples")
    torch.manual_seed(0)
    order = torch.randperm(windows.shape[0])
    bridge, info = train_bridge(
        model, args.head_layers, args.tail_layers, windows[order[held:]], windows[order[:held]],
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, num_layers=args.layers,
        ce_fraction=args.ce_fraction, draft_vocab=args.draft_vocab or None, progress=not args.no_progress,
    )  # fmt: skip
    info.update({"model": args.model, "tasks": tasks, "windows": int(windows.shape[0]) - held, "held_out": held})
    info["seconds"] = round(time.perf_counter() - t0, 1)
    path = save_bridge(bridge, args.out, info)
    print(json.dumps({"bridge": str(path), **info}))
    print(f"use it with: --speculative bridge:{path}", file=sys.stderr)
    return 0
