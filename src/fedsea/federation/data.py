"""Each client's local data in a federated run: a task's shard, or a JSONL file."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedsea.training.data import Example, load_jsonl


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
    tokenizer: PreTrainedTokenizerBase, shard: str | None, data: str | None, max_length: int
) -> list[Example]:
    """A client's training examples, from exactly one of a task shard or a JSONL file."""
    if (shard is None) == (data is None):
        raise ValueError("give exactly one of --shard (a task shard) or --data (a JSONL file)")
    if data is not None:
        return load_jsonl(data, tokenizer, max_length)
    spec = json.loads(Path(str(shard)).read_text())
    wanted = set(spec["ids"])
    chosen = [e for e in task_examples(spec["task"], spec["split"], spec.get("limit")) if e.id in wanted]
    if len(chosen) != len(wanted):
        raise ValueError(f"shard {shard}: {len(wanted) - len(chosen)} example ids not found in {spec['task']}")
    return encode_task_examples(tokenizer, chosen, max_length)
