"""Training examples from a JSONL file: ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}``.

Text rows train on every token; prompt/completion rows on the completion only. Each
example ends with the tokenizer's end-of-sequence token, so the model learns to stop.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedsea.training.batch import Batch, make_batch


@dataclass(frozen=True)
class Example:
    """One tokenized training sequence; the loss is taken on ``ids[loss_from:]``."""

    ids: tuple[int, ...]
    loss_from: int  # index of the first target token


def encode_example(tokenizer: PreTrainedTokenizerBase, prompt: str | None, completion: str, max_length: int) -> Example:
    """Token ids of ``prompt + completion + eos``; loss from the completion's first token.

    Over ``max_length`` the prompt is cut from the left (its end, next to the completion,
    matters most), then the completion from the right.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    target = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt is not None else []
    if not context:  # plain text: the first token is context for the rest
        context, target = target[:1], target[1:]
    target = target[: max(1, max_length - 1)]
    context = context[-max(1, max_length - len(target)) :]
    return Example(tuple(context + target), len(context))


def jsonl_rows(path: str | os.PathLike[str]) -> Iterator[tuple[str | None, str]]:
    """The (prompt, completion) of each row of a JSONL training file, checked: a ``{"text": ...}``
    row is (None, text), loss on every token; ``{"prompt": ..., "completion": ...}`` the pair.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a row of another shape (named by its line), or no rows at all.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no data file at {file}")
    rows = 0
    with file.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{file}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{file}:{number}: expected a JSON object")
            if isinstance(row.get("text"), str) and row["text"].strip():
                yield None, row["text"]
            elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str) and row["completion"]:
                yield row["prompt"], row["completion"]
            else:
                raise ValueError(f'{file}:{number}: expected {{"text": ...}} or {{"prompt": ..., "completion": ...}}')
            rows += 1
    if rows == 0:
        raise ValueError(f"{file} holds no examples")


def load_jsonl(
    path: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase, max_length: int = 512
) -> list[Example]:
    """Read and tokenize a JSONL file (``jsonl_rows``); a bad row raises ``ValueError`` naming its line."""
    return [encode_example(tokenizer, prompt, text, max_length) for prompt, text in jsonl_rows(path)]


def iterate_batches(
    examples: Sequence[Example], batch_size: int, pad_token_id: int, epochs: int = 1, seed: int = 0
) -> Iterator[Batch]:
    """Shuffled (seeded) batches of ``batch_size`` examples, ``epochs`` times over the data."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            chosen = [examples[i] for i in order[start : start + batch_size]]
            yield make_batch([e.ids for e in chosen], pad_token_id, loss_from=[e.loss_from for e in chosen])
