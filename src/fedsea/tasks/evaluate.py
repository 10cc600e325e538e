"""``evaluate(task, model, tokenizer)``: score a model on a task, with a JSON-able result.

Design decisions:
- Classification compares the log-likelihood of each verbalized choice after the prompt.
  When every choice of an example is a single token (``yes``/``no``, ``positive``/
  ``negative``), one forward pass of the prompt scores them all from the last slot's
  logits; otherwise each choice is its own sequence. Choices of varying length (COPA,
  ReCoRD) are compared by their mean token log-likelihood (``Task.length_norm``).
- Generation is greedy, until the end-of-turn token or ``max_new_tokens``.
- Work is done in length-sorted, left-padded batches under a token budget, with a tqdm bar
  on stderr. Dropout is off during evaluation and the model's mode is restored after.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedsea.errors import InvalidInputError
from fedsea.model.split import SplitModel
from fedsea.tasks.base import Example, Task, take
from fedsea.tasks.batching import length_sorted_batches, pad_left
from fedsea.tasks.prompts import encode_answer, encode_prompt, stop_token_id
from fedsea.tasks.registry import get_task
from fedsea.tasks.runners import Runner, as_runner

DEFAULT_MAX_TOKENS = 4096


@dataclass(frozen=True)
class EvalResult:
    """The outcome of one evaluation (``to_dict()`` is JSON-able).

    Attributes:
        task, split, source: what was evaluated and where its rows came from.
        num_examples: examples scored; metrics: metric name -> value in [0, 1].
        primary_metric: the task's headline metric.
        seconds: wall time of the scoring (data loading excluded).
        notes: remarks about the data (splits made here, stand-ins).
        predictions: per example ``{"id", "prediction", "gold"}`` when asked for.
    """

    task: str
    split: str
    source: str
    num_examples: int
    metrics: dict[str, float]
    primary_metric: str
    seconds: float
    notes: tuple[str, ...] = ()
    predictions: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-able dict, metrics and seconds rounded."""
        d = asdict(self)
        d["notes"] = list(self.notes)
        d["metrics"] = {k: round(v, 6) for k, v in self.metrics.items()}
        d["seconds"] = round(self.seconds, 3)
        if self.predictions is None:
            d.pop("predictions")
        return d

    def table(self) -> str:
        """A short plain-text table: one line per metric (in percent), then the notes."""
        lines = [f"{self.task} ({self.split}, {self.num_examples} examples, {self.seconds:.1f} s)"]
        names = [self.primary_metric, *sorted(k for k in self.metrics if k != self.primary_metric)]
        width = max(len(n) for n in names)
        lines += [f"  {n.ljust(width)}  {100 * self.metrics[n]:6.2f}" for n in names if n in self.metrics]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "seq") -> tqdm[Any]:
    """A tqdm bar on stderr; off when ``enabled`` is False or ``$FEDSEA_NO_PROGRESS`` is 1."""
    disable = not enabled or os.environ.get("FEDSEA_NO_PROGRESS") == "1"
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable, dynamic_ncols=True)


@dataclass
class _Item:
    example: int
    ids: list[int]
    # A continuation item scores ``cont`` (the last len(cont) ids) for choice ``choice``; a
    # next-token item (choice None) reads ``candidates`` from the last slot.
    choice: int | None = None
    cont: list[int] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)


def score_choices(
    runner: Runner,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    length_norm: bool = False,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    system: str | None = None,
    progress: bool = True,
    desc: str = "score",
) -> list[list[float]]:
    """Log-likelihood of each choice of each example after its prompt.

    Args:
        length_norm: mean over the choice's tokens instead of the sum.
        max_tokens: token budget of one batch.

    Returns:
        Per example, one score per choice (higher is more likely).
    """
    items: list[_Item] = []
    for i, ex in enumerate(examples):
        if not ex.choices:
            raise InvalidInputError("examples", f"example {ex.id} has no choices to score")
        prompt = encode_prompt(tokenizer, ex, system)
        answers = [encode_answer(tokenizer, c) for c in ex.choices]
        if not prompt or any(not a for a in answers):
            raise InvalidInputError("examples", f"example {ex.id} has an empty prompt or choice")
        if all(len(a) == 1 for a in answers):
            items.append(_Item(i, prompt, candidates=[a[0] for a in answers]))
        else:
            items.extend(_Item(i, prompt + a, choice=j, cont=a) for j, a in enumerate(answers))
    scores = [[0.0] * len(ex.choices) for ex in examples]
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    with progress_bar(len(items), desc, progress) as bar:
        for batch in length_sorted_batches([len(it.ids) for it in items], max_tokens):
            input_ids, lengths = pad_left([items[k].ids for k in batch], pad)
            keep = max(len(items[k].cont) for k in batch) + 1
            # On the CPU: the picks below index it with CPU tensors, whatever the model's device.
            logp = runner.logits(input_ids, lengths, keep).float().log_softmax(dim=-1).cpu()  # (B, keep, V)
            for row, k in enumerate(batch):
                it = items[k]
                if it.choice is None:
                    for j, token in enumerate(it.candidates):
                        scores[it.example][j] = float(logp[row, -1, token])
                    continue
                m = len(it.cont)
                # The slot before each continuation token predicts it: kept slots keep-1-m .. keep-2.
                picked = logp[row, keep - 1 - m : keep - 1].gather(-1, torch.tensor(it.cont).unsqueeze(-1))  # (m, 1)
                total = float(picked.sum())
                scores[it.example][it.choice] = total / m if length_norm else total
            bar.update(len(batch))
    return scores


def generate_answers(
    runner: Runner,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_new_tokens: int,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    system: str | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers (decoded, special tokens dropped, stripped) to each example's prompt."""
    prompts = [encode_prompt(tokenizer, ex, system) for ex in examples]
    if any(not p for p in prompts):
        raise InvalidInputError("examples", "generation needs a prompt in every example")
    stop = stop_token_id(tokenizer)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop or 0))
    answers = [""] * len(examples)
    with progress_bar(len(examples), desc, progress) as bar:
        for batch in length_sorted_batches([len(p) + max_new_tokens for p in prompts], max_tokens):
            input_ids, lengths = pad_left([prompts[k] for k in batch], pad)
            new = runner.generate(input_ids, lengths, max_new_tokens, eos_token_id=stop, pad_token_id=pad)
            for row, k in enumerate(batch):
                ids = new[row].tolist()
                if stop is not None and stop in ids:
                    ids = ids[: ids.index(stop)]
                answers[k] = cast(str, tokenizer.decode(ids, skip_special_tokens=True)).strip()  # one sequence: a str
            bar.update(len(batch))
    return answers


def evaluate(
    task: str | Task,
    model: PreTrainedModel | SplitModel | Runner,
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: str | None = None,
    limit: int | None = None,
    source: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    examples: Sequence[Example] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_new_tokens: int | None = None,
    system: str | None = None,
    progress: bool = True,
    keep_predictions: bool = False,
) -> EvalResult:
    """Evaluate a model, a split or a ``Runner`` on a task.

    Args:
        task: a registered name (``fedsea.tasks.list_tasks()``) or a ``Task``.
        model: an unsplit model (centralized), a ``SplitModel`` (split inference), or a ``Runner``.
        tokenizer: the model's tokenizer (its chat template, if any, wraps each prompt).
        split: the data split; defaults to the task's ``eval_split``.
        limit: score only the first ``limit`` examples (whole MultiRC questions).
        source: where the rows come from (``Task.load``); data_dir: the local data folder.
        examples: score these instead of loading the split.
        max_tokens: token budget of one batch (prompt + new tokens for generation).
        max_new_tokens: generation budget; defaults to the task's.
        system: a system message; ``None`` keeps the chat template's default.
        progress: show a progress bar on stderr.
        keep_predictions: include each example's prediction in the result.
    """
    task = get_task(task)
    runner = as_runner(model)
    split_name = split or task.eval_split
    notes: tuple[str, ...] = ()
    where = "given examples"
    if examples is None:
        examples, rows = task.examples(split_name, source, data_dir, limit)
        notes, where = rows.notes, rows.source
    else:
        examples = take(task.name, list(examples), limit)
    if any(ex.label is None and not ex.references for ex in examples):
        raise InvalidInputError("examples", f"{task.name}/{split_name} has examples without a gold answer")
    was_eval = runner.set_eval(True)
    t0 = time.perf_counter()
    try:
        predictions: list[int] | list[str]
        gold: list[Any]
        if task.kind == "classify":
            scores = score_choices(
                runner, tokenizer, examples, task.length_norm, max_tokens, system, progress, desc=task.name
            )
            predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
            gold = [ex.label for ex in examples]
        else:
            budget = max_new_tokens or task.max_new_tokens
            predictions = generate_answers(runner, tokenizer, examples, budget, max_tokens, system, progress, task.name)
            gold = [list(ex.references) for ex in examples]
    finally:
        runner.set_eval(was_eval)
    seconds = time.perf_counter() - t0
    metrics = task.scorer(examples, predictions)
    kept = None
    if keep_predictions:
        kept = [{"id": ex.id, "prediction": p, "gold": g} for ex, p, g in zip(examples, predictions, gold, strict=True)]
    return EvalResult(task.name, split_name, where, len(examples), metrics, task.primary_metric, seconds, notes, kept)
