"""Tasks, data, prompts, metrics, partitions and evaluation (the evaluation harness).

::

    import fedsea
    from fedsea import tasks

    model = fedsea.load_model("smollm2-135m")
    tokenizer = fedsea.load_tokenizer("smollm2-135m")
    result = tasks.evaluate("sst2", model, tokenizer, limit=200)   # or a SplitModel
    print(result.table())

    examples, rows = tasks.get_task("rte").examples("train")
    part = tasks.partition([e.label for e in examples], num_clients=4, scheme="dirichlet", alpha=0.5)
    print(part.table([e.label for e in examples], ["entailment", "not_entailment"]))

Tasks (``list_tasks()``): sst2, boolq, cb, copa, rte, wic, wsc, multirc, record (scored by
the log-likelihood of each verbalized choice), xsum, coqa, quac, jsonl (greedy generation).
Local data is read from ``$FEDSEA_DATA`` or ``../shared/datasets``; Hugging Face datasets
with ``source="hf"``.
"""

from fedsea.tasks.base import Example, HubSource, Task
from fedsea.tasks.batching import length_sorted_batches, pad_left, padding_fraction
from fedsea.tasks.data import DATA_ENV, Rows, TaskDataError, find_data_dir
from fedsea.tasks.evaluate import EvalResult, evaluate, generate_answers, score_choices
from fedsea.tasks.finetune import FinetuneConfig, FinetuneResult, finetune_central
from fedsea.tasks.partition import (
    Partition,
    dirichlet_partition,
    iid_partition,
    partition,
    size_skew_partition,
)
from fedsea.tasks.prompts import encode_answer, encode_for_training, encode_prompt, render_prompt
from fedsea.tasks.registry import get_task, list_tasks, register
from fedsea.tasks.runners import ModelRunner, Runner, SplitRunner, as_runner

__all__ = [
    "DATA_ENV",
    "EvalResult",
    "Example",
    "FinetuneConfig",
    "FinetuneResult",
    "HubSource",
    "ModelRunner",
    "Partition",
    "Rows",
    "Runner",
    "SplitRunner",
    "Task",
    "TaskDataError",
    "as_runner",
    "dirichlet_partition",
    "encode_answer",
    "encode_for_training",
    "encode_prompt",
    "evaluate",
    "find_data_dir",
    "finetune_central",
    "generate_answers",
    "get_task",
    "iid_partition",
    "length_sorted_batches",
    "list_tasks",
    "pad_left",
    "padding_fraction",
    "partition",
    "register",
    "render_prompt",
    "score_choices",
    "size_skew_partition",
]
