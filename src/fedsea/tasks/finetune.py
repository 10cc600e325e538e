"""The centralized LoRA fine-tuning baseline: the reference federated runs are compared to.

``finetune_central`` trains a ``SplitModel``'s adapters through ``fedsea.CentralTrainer``
(the unsplit model, the same per-part adapters and optimizers as a split client) on a task's
train split, for a fixed budget of optimizer steps. Each training sequence is the prompt,
the gold answer and the end-of-turn token, with the loss on the answer and the end only
(``fedsea.tasks.prompts.encode_for_training``), so that a fine-tuned model learns to give
exactly what evaluation scores.

Batches: the train examples are shuffled (seeded) once per epoch and, within windows of 16
batches, sorted by length before being cut, so that a batch holds sequences of similar
length (the Hugging Face ``group_by_length`` trick); sequences longer than
``max_seq_len`` are left out and counted.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedsea.config import OptimConfig
from fedsea.errors import InvalidInputError
from fedsea.model.split import SplitModel
from fedsea.tasks.base import Example, Task
from fedsea.tasks.evaluate import progress_bar
from fedsea.tasks.prompts import encode_for_training
from fedsea.tasks.registry import get_task
from fedsea.training import CentralTrainer, make_batch


@dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning budget and optimizer.

    Args:
        steps (`int`, defaults to 40): optimizer steps.
        batch_size (`int`, defaults to 8): sequences per step.
        lr (`float`, defaults to 5e-4): AdamW learning rate (weight decay and clipping as in ``OptimConfig``).
        max_seq_len (`int`, defaults to 768): longer training sequences are left out.
        seed (`int`, defaults to 0): seed of the data order.
    """

    steps: int = 40
    batch_size: int = 8
    lr: float = 5e-4
    max_seq_len: int = 768
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tuning run did (``asdict`` is JSON-able).

    Attributes:
        steps: optimizer steps taken; sequences: sequences trained on (with repeats); tokens:
            their padded size in tokens; target_tokens: tokens the loss was taken on.
        train_examples: usable train examples; skipped_long: those over ``max_seq_len``.
        first_loss / last_loss: mean loss of the first / last (up to) 5 steps.
        losses: every step's loss; seconds: wall time.
    """

    steps: int
    sequences: int
    tokens: int
    target_tokens: int
    train_examples: int
    skipped_long: int
    first_loss: float
    last_loss: float
    losses: list[float]
    seconds: float

    def to_dict(self) -> dict[str, object]:
        """The report as JSON-able dict, losses and seconds rounded."""
        d = asdict(self)
        d["losses"] = [round(x, 4) for x in self.losses]
        d["seconds"] = round(self.seconds, 2)
        return d


def training_batches(lengths: Sequence[int], batch_size: int, seed: int, window: int = 16) -> Iterator[list[int]]:
    """Endless batches of indices: a seeded shuffle per epoch, length-grouped within windows."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    while True:
        order = rng.permutation(n).tolist()
        span = batch_size * window
        batches: list[list[int]] = []
        for start in range(0, n, span):
            chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
            batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
        for k in rng.permutation(len(batches)).tolist():
            yield batches[k]


def finetune_central(
    split: SplitModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str | Task,
    config: FinetuneConfig | None = None,
    *,
    examples: Sequence[Example] | None = None,
    source: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    system: str | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``split``'s LoRA adapters on a task's train split, centrally (unsplit model).

    Args:
        split: a ``SplitModel`` with adapters (``split.add_lora(...)``); they are trained in place.
        tokenizer: the model's tokenizer.
        task: a registered task name or a ``Task``.
        config: the budget (steps, batch size, learning rate, longest sequence, seed).
        examples: train on these instead of the task's train split.
        source, data_dir: where the train split comes from (see ``Task.load``).
        system: a system message; ``None`` keeps the chat template's default.
        progress: show a progress bar with the loss on stderr.
    """
    config = config or FinetuneConfig()
    task = get_task(task)
    if not any("lora_" in n for n, _ in split.model.named_parameters()):
        raise InvalidInputError("split", "has no LoRA adapters to train; call split.add_lora(...) first")
    if examples is None:
        examples, _ = task.examples("train", source, data_dir)
    encoded = [encode_for_training(tokenizer, ex, system) for ex in examples if _has_target(ex)]
    usable = [e for e in encoded if len(e[0]) <= config.max_seq_len]
    if not usable:
        raise InvalidInputError("examples", f"no {task.name} train example fits max_seq_len={config.max_seq_len}")
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    trainer = CentralTrainer(split, OptimConfig(lr=config.lr))
    batches = training_batches([len(ids) for ids, _ in usable], config.batch_size, config.seed)
    losses: list[float] = []
    sequences = tokens = targets = 0
    t0 = time.perf_counter()
    with progress_bar(config.steps, f"finetune {task.name}", progress, unit="step") as bar:
        for _ in range(config.steps):
            chosen = [usable[i] for i in next(batches)]
            batch = make_batch([ids for ids, _ in chosen], pad, loss_from=[start for _, start in chosen])
            step = trainer.train_step(batch)
            losses.append(step.loss)
            sequences += len(chosen)
            tokens += int(batch.input_ids.numel())
            targets += step.num_targets
            bar.set_postfix(loss=f"{step.loss:.3f}")
            bar.update(1)
    split.model.eval()
    return FinetuneResult(
        steps=config.steps,
        sequences=sequences,
        tokens=tokens,
        target_tokens=targets,
        train_examples=len(usable),
        skipped_long=len(encoded) - len(usable),
        first_loss=float(np.mean(losses[:5])),
        last_loss=float(np.mean(losses[-5:])),
        losses=losses,
        seconds=time.perf_counter() - t0,
    )


def _has_target(example: Example) -> bool:
    return (example.choices and example.label is not None) or bool(example.references)
