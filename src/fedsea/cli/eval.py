"""``fedsea eval``: what the command does (its arguments are declared in ``fedsea.cli``).

Without ``--adapter`` or partition points the unsplit model is evaluated (the centralized
reference). With them, the model is split at (P, Q), the saved head/trunk/tail adapters
are loaded, and evaluation runs through the three parts (split inference, in process).
P and Q default to the partition the adapters were saved with. ``--adapter`` also takes a
federated run's folder (its latest round) or a round checkpoint: each part takes its blocks of
the global adapter, and P and Q default to the run's (``fedsea.federation.run_adapters``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import PreTrainedModel

from fedsea.cli.flags import settings_from_flags
from fedsea.config import Placement
from fedsea.errors import InvalidInputError
from fedsea.federation.run_adapters import load_run_adapters, run_cut, run_source
from fedsea.model.adapters import read_adapter
from fedsea.model.load import load_model, load_tokenizer
from fedsea.model.split import SplitModel, split_model
from fedsea.tasks.evaluate import evaluate


def saved_partition(adapter_dir: str | Path, num_layers: int) -> tuple[int | None, int | None]:
    """(P, Q) as recorded in a saved adapter folder's head/ and tail/ configs (``None`` if absent)."""
    p = q = None
    if (Path(adapter_dir) / "head").is_dir():
        p = int(read_adapter(Path(adapter_dir) / "head")[2]["layers"][1])  # type: ignore[index]
    if (Path(adapter_dir) / "tail").is_dir():
        q = num_layers - int(read_adapter(Path(adapter_dir) / "tail")[2]["layers"][0])  # type: ignore[index]
    return p, q


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate ``args.model`` (optionally split, with adapters) on ``args.task``; print a table and JSON."""
    placement = settings_from_flags(args, Placement())
    model = load_model(args.model, placement.dtype, placement.device)
    tokenizer = load_tokenizer(args.model)
    target: PreTrainedModel | SplitModel = model
    p, q = args.head_layers, args.tail_layers
    run = run_source(args.adapter) if args.adapter is not None else None  # a federated run's result
    if args.adapter is not None or p is not None or q is not None:
        if args.adapter is not None and (p is None or q is None):
            saved: tuple[int | None, int | None] = (
                run_cut(args.adapter)  # the run's (p, q)
                if run is not None
                else saved_partition(args.adapter, int(model.config.num_hidden_layers))
            )
            saved_p, saved_q = saved
            p, q = p if p is not None else saved_p, q if q is not None else saved_q
        if p is None or q is None:
            raise InvalidInputError("--head-layers/--tail-layers", "give both P and Q to evaluate through a split")
        split = split_model(model, p, q)
        if run is not None:
            load_run_adapters(split, args.adapter)  # each part's blocks of the global adapter
        elif args.adapter is not None:
            split.load_adapters(args.adapter)
        target = split
    result = evaluate(
        args.task,
        target,
        tokenizer,
        split=args.split,
        limit=args.limit,
        source=args.data,
        data_dir=args.data_dir,
        max_tokens=args.max_tokens,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
        keep_predictions=args.predictions,
    )
    out = result.to_dict()
    out["model"] = args.model
    out["adapter"] = str(args.adapter) if args.adapter is not None else None
    out["partition"] = [p, q] if isinstance(target, SplitModel) else None
    if not args.json:
        where = f"split at ({p}, {q})" if isinstance(target, SplitModel) else "unsplit"
        adapter = f", adapters {args.adapter}" if args.adapter else ""
        print(f"model {args.model} ({where}{adapter}); data {result.source}")
        print(result.table())
    print(json.dumps(out))
    return 0
