"""Each client's local data in a federated run: a task's shard, or a JSONL file.

A run file names a client's own file with ``data`` (``[[clients]]``, or ``[task] data`` for every
client without one): simulate writes it into the client's shard (``write_data_shard``), so
``fedsea join --shard``, the Flower ClientApp and the native coordinator all read it the same way.
The last ``[task] holdout`` share of each file's rows (default 0.1) is held out of training and
scored each round as that client's held-out loss (``mean_loss``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedsea.training.data import Example, jsonl_rows, load_jsonl


def write_shard(path: str | os.PathLike[str], task: str, split: str, ids: Sequence[str], limit: int | None) -> None:
    """A shard names examples of a task by id; the client reads the rows from its own disk."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"task": task, "split": split, "limit": limit, "ids": list(ids)}))


def task_examples(task: str, split: str, limit: int | None) -> list[Any]:
    """Up to ``limit`` examples of a task split, keeping only those with choices or references."""
    from fedsea import tasks

    examples, _ = tasks.get_task(task).examples(split, limit=limit)
    return [e for e in examples if e.choices or e.references]


def encode_task_examples(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Any], max_length: int) -> list[Example]:
    """Task examples as training examples: chat-formatted prompt, loss on the answer only."""
    from fedsea import tasks

    out = []
    for example in examples:
        ids, loss_from = tasks.encode_for_training(tokenizer, example)
        if len(ids) > max_length:  # keep the answer: cut the prompt from the left
            cut = len(ids) - max_length
            ids, loss_from = ids[cut:], max(1, loss_from - cut)
        out.append(Example(tuple(ids), max(1, loss_from)))
    return out


def load_client_data(
    tokenizer: PreTrainedTokenizerBase,
    shard: str | None,
    data: str | None,
    max_length: int,
    own: Any = None,
    holdout: float = 0.0,
) -> list[Example]:
    """A client's training examples, from exactly one of a task shard or a JSONL file; with
    neither, the client's own file in the run file (``own``: its ``ClientPlan``, whose ``data``
    is read at its ``max_length``, the last ``holdout`` share of rows held out)."""
    if shard is None and data is None and own is not None and own.data is not None:
        return own_examples(tokenizer, own, holdout)[0]
    if (shard is None) == (data is None):
        raise ValueError(
            "give exactly one of --shard (a task shard) or --data (a JSONL file), or name the client's data "
            "file in the run file ([[clients]] data or [task] data)"
        )
    if data is not None:
        return load_jsonl(data, tokenizer, max_length)
    spec = json.loads(Path(str(shard)).read_text())
    if "data" in spec:  # the client's own file, named in the run file: train on all but the held-out rows
        return split_holdout(load_jsonl(spec["data"], tokenizer, max_length), float(spec.get("holdout", 0.0)))[0]
    wanted = set(spec["ids"])
    chosen = [e for e in task_examples(spec["task"], spec["split"], spec.get("limit")) if e.id in wanted]
    if len(chosen) != len(wanted):
        raise ValueError(f"shard {shard}: {len(wanted) - len(chosen)} example ids not found in {spec['task']}")
    return encode_task_examples(tokenizer, chosen, max_length)


# A client's own JSONL file, named in the run file: its shard records the file and the held-out share.
def write_data_shard(path: str | os.PathLike[str], data: str, holdout: float) -> None:
    """A client's shard that names its own JSONL file (absolute) and the share of rows held out."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"data": data, "holdout": holdout}))


def holdout_count(rows: int, holdout: float) -> int:
    """How many of a file's ``rows`` (its last ones) are held out: floor(rows x holdout), leaving
    at least one training row; 0 when that floor is 0 (then the held-out loss is scored on the
    training rows, and says so)."""
    return max(0, min(rows - 1, math.floor(rows * holdout)))


def split_holdout(examples: Sequence[Example], holdout: float) -> tuple[list[Example], list[Example]]:
    """(training rows, held-out rows) of one file's examples: the last ``holdout_count`` are held out."""
    held = holdout_count(len(examples), holdout)
    cut = len(examples) - held
    return list(examples[:cut]), list(examples[cut:])


def check_jsonl(path: str | os.PathLike[str]) -> int:
    """The number of rows of a JSONL training file, checked as ``load_jsonl`` reads it (without
    a tokenizer: in the parent, before any process starts).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a row that is not ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}``
            (named by its line), or no rows at all.
    """
    return sum(1 for _ in jsonl_rows(path))


def check_client_data(clients: Sequence[Any]) -> dict[str, int]:
    """Check every client's own JSONL file (``ClientPlan.data``); return its rows by client name.

    Raises:
        ValueError: one line naming the client and the file (missing, unreadable, or a bad row).
    """
    rows = {}
    for client in clients:
        if client.data is None:
            continue
        try:
            rows[client.name] = check_jsonl(client.data)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{client.name}: data file {client.data}: {exc}") from None
    return rows


def own_examples(
    tokenizer: PreTrainedTokenizerBase, client: Any, holdout: float
) -> tuple[list[Example], list[Example]]:
    """(training rows, held-out rows) of a client's own file, tokenized at its ``max_length``."""
    return split_holdout(load_jsonl(str(client.data), tokenizer, client.max_length), holdout)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, examples: Sequence[Example]) -> float:
    """The mean next-token loss of a causal LM over the target tokens of ``examples`` (one
    sequence at a time: no padding, so the loss is the unsplit model's own)."""
    from fedsea.training.batch import lm_loss, make_batch

    total, targets = 0.0, 0
    device = next(model.parameters()).device
    for example in examples:
        batch = make_batch([example.ids], 0, loss_from=[example.loss_from]).to(device)
        logits = model(input_ids=batch.input_ids).logits  # (1, n, V)
        count = batch.num_targets
        total += float(lm_loss(logits.float(), batch.labels)) * count
        targets += count
    return total / max(1, targets)


def own_data_table(clients: Sequence[Any], holdout: float) -> str:
    """The report's partition table for clients on their own files: rows trained, held out, file."""
    lines = [f"{'client':<12} {'rows':>6} {'held out':>9}  file"]
    for client in clients:
        if client.data is not None:
            rows = check_jsonl(client.data)
            held = holdout_count(rows, holdout)
            lines.append(f"{client.name:<12} {rows - held:>6} {held:>9}  {client.data}")
    return "\n".join(lines)


def heldout_losses(clients: Sequence[Any], holdout: float, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
    """For the clients on their own files: ``heldout_loss/<client>``, the model's mean token loss on
    the client's held-out rows (on its training rows where none are held out), and ``heldout_loss``,
    the mean of those over the clients (each client weighs the same, whatever its file's size)."""
    per_client = {}
    for client in clients:
        if client.data is not None:
            train, held = own_examples(tokenizer, client, holdout)
            per_client[f"heldout_loss/{client.name}"] = mean_loss(model, held or train)
    if not per_client:
        return {}
    return {"heldout_loss": sum(per_client.values()) / len(per_client), **per_client}
