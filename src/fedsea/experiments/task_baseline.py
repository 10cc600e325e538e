"""The centralized baseline table: zero-shot, then after centralized LoRA fine-tuning.

``fedsea baseline --json`` evaluates the default model zero-shot on each
task, fine-tunes fresh LoRA adapters on the task's train split for a fixed small budget
(``CLASSIFY_BUDGET`` / ``GENERATE_BUDGET``) through ``fedsea.CentralTrainer``, and evaluates
again. One JSON line per task goes to stdout, and a Markdown table at the end (the one in
BENCHMARKS.md). These are the references that federated runs are compared to.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedsea.config import LoraSpec
from fedsea.experiments.constants import BASELINE_ROWS as BASELINE_ROWS
from fedsea.model.load import DEFAULT_MODEL, load_model, load_tokenizer
from fedsea.model.split import split_model
from fedsea.tasks.evaluate import evaluate
from fedsea.tasks.finetune import FinetuneConfig, finetune_central
from fedsea.tasks.registry import get_task

# The fixed budget, sized for a 2-core CPU: classification sequences are short, generation
# ones (an article, a passage with its dialog) are 5-10 times longer.
CLASSIFY_BUDGET = FinetuneConfig(steps=24, batch_size=4, lr=1e-3, max_seq_len=1024, seed=0)
GENERATE_BUDGET = FinetuneConfig(steps=12, batch_size=2, lr=1e-3, max_seq_len=1024, seed=0)
BASELINE_LORA = LoraSpec(r=8, alpha=16, dropout=0.05)
BASELINE_SPLIT = (2, 2)


@dataclass(frozen=True)
class BaselineRow:
    """One task's centralized LoRA baseline: zero-shot and fine-tuned metrics, budget and notes."""

    task: str
    rows: int
    primary_metric: str
    zero_shot: dict[str, float]
    finetuned: dict[str, float]
    finetune: dict[str, Any]
    seconds: float
    notes: list[str]


def run_task(
    task_name: str, rows: int, model_source: str = DEFAULT_MODEL, seed: int = 0, progress: bool = True
) -> BaselineRow:
    """Zero-shot eval, centralized LoRA fine-tuning, eval again, for one task."""
    t0 = time.perf_counter()
    task = get_task(task_name)
    model = load_model(model_source)
    tokenizer = load_tokenizer(model_source)
    before = evaluate(task, model, tokenizer, limit=rows, progress=progress)
    torch.manual_seed(seed)  # LoRA init and dropout draw from the global generator
    split = split_model(model, *BASELINE_SPLIT).add_lora(BASELINE_LORA)
    budget = CLASSIFY_BUDGET if task.kind == "classify" else GENERATE_BUDGET
    tuned = finetune_central(split, tokenizer, task, budget, progress=progress)
    after = evaluate(task, model, tokenizer, limit=rows, progress=progress)
    finetune = {**tuned.to_dict(), "budget": budget.__dict__, "lora": BASELINE_LORA.to_dict()}
    return BaselineRow(
        task.name,
        before.num_examples,
        task.primary_metric,
        before.metrics,
        after.metrics,
        finetune,
        time.perf_counter() - t0,
        list(before.notes),
    )


def markdown_table(rows: Sequence[BaselineRow]) -> str:
    """The baseline as a Markdown table, metrics in percent."""
    lines = [
        "| task | rows | metric | zero-shot | after LoRA | fine-tuning (steps x batch, train tokens, s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        names = [r.primary_metric, *sorted(k for k in r.zero_shot if k != r.primary_metric)]
        for n in names:
            ft = r.finetune
            budget = f"{ft['steps']} x {ft['budget']['batch_size']}, {ft['tokens']:,}, {ft['seconds']:.0f}"
            lines.append(
                f"| {r.task} | {r.rows} | {n} | {100 * r.zero_shot[n]:.1f} | {100 * r.finetuned[n]:.1f} | "
                f"{budget if n == r.primary_metric else ''} |"
            )
    return "\n".join(lines)
