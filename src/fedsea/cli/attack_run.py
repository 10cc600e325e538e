"""``fedsea attack``: what the command does (its arguments are declared in ``fedsea.cli.attack``).

It loads the model, the attacker's public auxiliary text and the victim's text, builds a
``GridConfig`` from the flags, and runs ``run_attack_grid`` with real training callbacks:
utility is the task's quality after fine-tuning under each setting (``finetune_utility``)
or the grid's cheap default (base-model perplexity under noise), and the victim's head is
the public one or a privately fine-tuned one (``finetuned_victim_head``, required for the
head defences ``nopeek`` and ``adversarial``).

Default data, all local when offline (``fedsea.tasks``): the attacker trains on XSum
validation documents; the victim's text is XSum test summaries (another source, same
domain, as in the issue's reference measurement), or the task's own prompts (``--victim task``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from fedsea.experiments.attack_grid import HEAD_DEFENCES, GridConfig, VictimHeadFn, run_attack_grid
from fedsea.experiments.privacy_utility import UtilityConfig, finetune_utility, finetuned_victim_head
from fedsea.privacy.attacks import TrainConfig
from fedsea.tasks.finetune import FinetuneConfig
from fedsea.tasks.registry import get_task

__all__ = ["finetune_utility", "finetuned_victim_head", "grid_config", "run_attack", "utility_config"]

AUX_TASK, AUX_SPLIT, AUX_FIELD = "xsum", "validation", "document"
VICTIM_SPLIT, VICTIM_FIELD = "test", "summary"


def say(message: str) -> None:
    """A progress line on stdout, flushed (a grid runs for minutes to hours)."""
    print(message, flush=True)


def grid_config(args: argparse.Namespace) -> GridConfig:
    """The grid the flags ask for (``ValueError`` naming the bad field)."""
    return GridConfig(
        sigmas=tuple(args.sigma),
        relative=args.relative,
        head_layers=tuple(args.head_layers),
        tail_layers=args.tail_layers,
        defences=tuple(args.defence),
        attacks=tuple(args.attacks),
        clip_norm=args.clip_norm,
        releases=args.releases,
        delta=args.delta,
        max_tokens=args.max_tokens,
        train=TrainConfig(epochs=args.epochs, width=args.probe_width, batch_size=32, seed=args.seed),
        seed=args.seed,
        attacker_heads=tuple(args.attacker_head),
    )


def utility_config(args: argparse.Namespace) -> UtilityConfig:
    """Task, fine-tuning budget and evaluation of the training callbacks."""
    finetune = FinetuneConfig(
        steps=args.finetune_steps, batch_size=args.finetune_batch_size, lr=args.finetune_lr, seed=args.seed
    )
    return UtilityConfig(
        task=args.task,
        finetune=finetune,
        eval_limit=args.eval_limit,
        regularizer_weight=args.regularizer_weight,
        data_dir=args.data_dir,
    )


def victim_head_mode(args: argparse.Namespace, defences: Sequence[str], knows: bool = False) -> str:
    """``base``, ``finetuned`` or ``utility``: the flag, or by default ``finetuned`` exactly when a
    head defence (or an attacker who knows the victim's head) asks for one."""
    wanted = [f"--defence {d}" for d in defences if d in HEAD_DEFENCES] + (["--attacker-head victim"] if knows else [])
    if args.victim_head == "utility" and args.utility != "finetune":
        raise ValueError("--victim-head utility is the head trained for --utility finetune, which is off")
    if args.victim_head is None:
        return "finetuned" if wanted else "base"
    if args.victim_head == "base" and wanted:
        raise ValueError(
            f"{', '.join(wanted)} needs a victim head with a private adapter: "
            "--victim-head finetuned (the default then) or utility"
        )
    return str(args.victim_head)


def _field_texts(task: str, split: str, name: str, count: int, data_dir: str | None) -> list[str]:
    rows = get_task(task).load(split, None, data_dir).rows
    texts = [str(r[name]) for r in rows if str(r.get(name, "")).strip()]
    if not texts:
        raise ValueError(f"{task}/{split} has no {name!r} text")
    return texts[:count]


def auxiliary_texts(count: int, data_dir: str | None = None) -> list[str]:
    """The attacker's public text: the first ``count`` XSum validation documents."""
    return _field_texts(AUX_TASK, AUX_SPLIT, AUX_FIELD, count, data_dir)


def victim_texts(source: str, count: int, task: str, data_dir: str | None = None) -> list[str]:
    """The victim's text: XSum test summaries (``xsum``), or the user messages of ``task``'s eval split (``task``)."""
    if source == "xsum":
        return _field_texts(AUX_TASK, VICTIM_SPLIT, VICTIM_FIELD, count, data_dir)
    examples, _ = get_task(task).examples(None, None, data_dir, count)
    texts = [ex.prompt for ex in examples if ex.prompt.strip()]
    if not texts:
        raise ValueError(f"{task} has no prompts to use as victim text")
    return texts[:count]


def run_attack(args: argparse.Namespace) -> int:
    """Run the grid the flags describe; print progress, the table and plot paths, and the best attacks."""
    from fedsea.cli.flags import settings_from_flags
    from fedsea.config import Placement
    from fedsea.experiments.privacy_report import best_attacks, markdown_table, write_report
    from fedsea.model.load import load_model, load_tokenizer
    from fedsea.model.split import check_partition

    grid = grid_config(args)  # every flag is checked before anything is loaded
    config = utility_config(args)
    head_mode = victim_head_mode(args, grid.defences, "victim" in grid.attacker_heads)
    out = Path(args.out or f"runs/attack-{time.strftime('%Y%m%d-%H%M%S')}")
    start = time.monotonic()
    say(f"loading {args.model}")
    where = settings_from_flags(args, Placement())
    model = load_model(args.model, where.dtype, where.device)
    tokenizer = load_tokenizer(args.model)
    for p in grid.head_layers:
        check_partition(int(model.config.num_hidden_layers), p, grid.tail_layers)
    aux = auxiliary_texts(args.aux_texts, args.data_dir)
    victim = victim_texts(args.victim, args.victim_texts, args.task, args.data_dir)
    say(f"attacker: {len(aux)} {AUX_TASK} {AUX_SPLIT} documents; victim: {len(victim)} texts ({args.victim})")
    utility = finetune_utility(model, tokenizer, grid, aux, config, say) if args.utility == "finetune" else None
    heads: VictimHeadFn | None = None
    if head_mode == "finetuned":
        heads = finetuned_victim_head(model, tokenizer, grid, aux, config, say)
    elif head_mode == "utility" and utility is not None:
        heads = utility.victim_head
    grid_size = len(grid.defences) * len(grid.head_layers) * len(grid.sigmas)
    say(f"grid: {grid_size} settings x {len(grid.attacks)} attacks; utility: {args.utility}; victim head: {head_mode}")
    rows = run_attack_grid(
        model,
        tokenizer,
        aux,
        victim,
        grid,
        victim_head=heads,
        utility=utility,
        utility_name=utility.name if utility is not None else "task quality",
        log=say,
    )
    paths = write_report(rows, out)
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "argv")}
    (out / "attack_config.json").write_text(json.dumps(settings, indent=1, default=str))
    say(f"done in {time.monotonic() - start:.0f}s")
    print(f"table: {paths['md']} (also {paths['csv'].name}, {paths['json'].name})")
    print(f"plot: {paths['png']}")
    print("\nbest attack per setting:\n")
    print(markdown_table(best_attacks(rows)), end="")
    return 0
