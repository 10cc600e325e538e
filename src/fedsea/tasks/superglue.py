"""The SuperGLUE tasks: BoolQ, CB, COPA, RTE, WiC, WSC, MultiRC and ReCoRD.

Canonical rows are the Hugging Face ``super_glue`` rows (integer labels; MultiRC one row
per answer option; ReCoRD one row per query with the sorted unique entity and answer
strings). The local SuperGLUE JSONL files are normalized into them, so both sources give
the same rows. Each row becomes one ``Example`` whose choices are verbalized labels
(``yes``/``no``, ...), or the candidate sentences (COPA) or entities (ReCoRD).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import SupportsInt, cast

from fedsea.tasks.base import Example, HubSource, Scorer, Task
from fedsea.tasks.data import Holdout, Row, file_loader, local_loader
from fedsea.tasks.metrics import accuracy, macro_f1, multirc_scores, qa_scores

HUB = "aps/super_glue"
# Verbalizers are capitalized: an instruct model starts its reply with "Yes"/"No" (SmolLM2
# puts ~1% of its mass on "yes"/"no" there, ~60% on "Yes"/"No").
YES_NO = ("No", "Yes")  # label 0 = False, 1 = True


def _int_label(value: object, names: Sequence[str] = ()) -> int:
    """A label as SuperGLUE on the Hub has it: an int, bools as 0/1, names by index; -1 when missing."""
    if value is None:
        return -1
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        return names.index(value)
    return int(cast("SupportsInt", value))  # a number (int or float) from the data


def _gold(row: Row) -> int | None:
    return None if row["label"] < 0 else int(row["label"])


def _pick(row: Row, keys: Sequence[str]) -> Row:
    return {k: row[k] for k in keys}


def _accuracy_scorer(examples: Sequence[Example], predictions: Sequence[int] | Sequence[str]) -> dict[str, float]:
    return {"accuracy": accuracy(list(predictions), [e.label for e in examples])}


def _simple_task(
    name: str,
    description: str,
    keys: tuple[str, ...],
    label_names: tuple[str, ...],
    to_example: Callable[[Row], Example],
    local: dict[str, str],
    holdout: Holdout | None = None,
    config: str | None = None,
    scorer: Scorer = _accuracy_scorer,
    length_norm: bool = False,
    verbal: tuple[str, ...] = (),
) -> Task:
    """A task with one row per record and a label (possibly a name) in ``label``."""

    def local_norm(rec: Row) -> Iterable[Row]:
        row = _pick(rec, [k for k in keys if k != "label"])
        row["label"] = _int_label(rec.get("label"), label_names)
        yield row

    def hub_norm(rec: Row) -> Iterable[Row]:
        yield _pick(rec, keys)

    return Task(
        name=name,
        kind="classify",
        description=description,
        to_example=to_example,
        scorer=scorer,
        primary_metric="accuracy",
        load_local=local_loader(name, local, local_norm, holdout=holdout),
        load_file=file_loader(local_norm),
        hub=HubSource(HUB, config or name, hub_norm),
        label_names=verbal or label_names,
        length_norm=length_norm,
    )


def _boolq(row: Row) -> Example:
    prompt = f"{row['passage']}\n\nQuestion: {row['question']}?\nAnswer yes or no."
    return Example(str(row["idx"]), prompt, YES_NO, _gold(row))


def _cb(row: Row) -> Example:
    prompt = f'{row["premise"]}\n\nQuestion: Is it true that "{row["hypothesis"]}"? Answer yes, no or maybe.'
    return Example(str(row["idx"]), prompt, ("Yes", "No", "Maybe"), _gold(row))


def _rte(row: Row) -> Example:
    prompt = f'{row["premise"]}\n\nQuestion: Does this mean that "{row["hypothesis"]}"? Answer yes or no.'
    return Example(str(row["idx"]), prompt, ("Yes", "No"), _gold(row))


def _copa(row: Row) -> Example:
    asked = "What was the cause?" if row["question"] == "cause" else "What happened as a result?"
    prompt = (
        f"{row['premise']}\n\n{asked}\nOption 1: {row['choice1']}\nOption 2: {row['choice2']}\n"
        "Answer with the sentence of the right option."
    )
    return Example(str(row["idx"]), prompt, (row["choice1"], row["choice2"]), _gold(row))


def _wic(row: Row) -> Example:
    prompt = (
        f"Sentence 1: {row['sentence1']}\nSentence 2: {row['sentence2']}\n\n"
        f'Question: Is the word "{row["word"]}" used with the same meaning in both sentences? Answer yes or no.'
    )
    return Example(str(row["idx"]), prompt, YES_NO, _gold(row))


def _wsc(row: Row) -> Example:
    prompt = (
        f"{row['text']}\n\nQuestion: In the passage above, does the pronoun "
        f'"{row["span2_text"]}" refer to "{row["span1_text"]}"? Answer yes or no.'
    )
    return Example(str(row["idx"]), prompt, YES_NO, _gold(row))


def _cb_scorer(examples: Sequence[Example], predictions: Sequence[int] | Sequence[str]) -> dict[str, float]:
    labels = [cast(int, e.label) for e in examples]  # scored examples have their gold label
    preds = [int(p) for p in predictions]
    return {"accuracy": accuracy(preds, labels), "macro_f1": macro_f1(preds, labels, 3)}


BOOLQ = _simple_task(
    "boolq",
    "BoolQ: yes/no questions on a Wikipedia passage (accuracy)",
    ("question", "passage", "idx", "label"),
    ("False", "True"),
    _boolq,
    {},
    holdout=Holdout("boolq/val.jsonl", fraction=0.2, seed=0),
    verbal=YES_NO,
)
CB = _simple_task(
    "cb",
    "CommitmentBank: does the premise commit to the hypothesis (accuracy, macro-F1)",
    ("premise", "hypothesis", "idx", "label"),
    ("entailment", "contradiction", "neutral"),
    _cb,
    {"train": "cb/train.jsonl", "validation": "cb/val.jsonl"},
    scorer=_cb_scorer,
)
RTE = _simple_task(
    "rte",
    "RTE: textual entailment (accuracy)",
    ("premise", "hypothesis", "idx", "label"),
    ("entailment", "not_entailment"),
    _rte,
    {"train": "rte/train.jsonl", "validation": "rte/val.jsonl"},
)
COPA = _simple_task(
    "copa",
    "COPA: the more plausible cause or effect of a premise (accuracy)",
    ("premise", "choice1", "choice2", "question", "idx", "label"),
    (),
    _copa,
    {"train": "copa/train.jsonl", "validation": "copa/val.jsonl"},
    length_norm=True,
    verbal=("choice1", "choice2"),
)
WIC = _simple_task(
    "wic",
    "WiC: is a word used with the same sense in two sentences (accuracy)",
    ("word", "sentence1", "sentence2", "start1", "start2", "end1", "end2", "idx", "label"),
    (),
    _wic,
    {"train": "wic/train.jsonl", "validation": "wic/val.jsonl"},
    verbal=YES_NO,
)


def _wsc_local(rec: Row) -> Iterable[Row]:
    target = rec["target"]
    yield {
        "text": rec["text"],
        "span1_index": target["span1_index"],
        "span2_index": target["span2_index"],
        "span1_text": target["span1_text"],
        "span2_text": target["span2_text"],
        "idx": rec["idx"],
        "label": _int_label(rec.get("label")),
    }


_WSC_KEYS = ("text", "span1_index", "span2_index", "span1_text", "span2_text", "idx", "label")
WSC = Task(
    name="wsc",
    kind="classify",
    description="WSC: does a pronoun refer to a given noun phrase (accuracy)",
    to_example=_wsc,
    scorer=_accuracy_scorer,
    primary_metric="accuracy",
    load_local=local_loader("wsc", {"train": "wsc/train.jsonl", "validation": "wsc/val.jsonl"}, _wsc_local),
    load_file=file_loader(_wsc_local),
    hub=HubSource(HUB, "wsc.fixed", lambda r: [_pick(r, _WSC_KEYS)]),
    label_names=YES_NO,
)


def _multirc_local(rec: Row) -> Iterable[Row]:
    passage = rec["passage"]
    for question in passage["questions"]:
        for answer in question["answers"]:
            yield {
                "paragraph": passage["text"],
                "question": question["question"],
                "answer": answer["text"],
                "idx": {"paragraph": rec["idx"], "question": question["idx"], "answer": answer["idx"]},
                "label": _int_label(answer.get("label")),
            }


def _multirc(row: Row) -> Example:
    idx = row["idx"]
    prompt = (
        f"{row['paragraph']}\n\nQuestion: {row['question']}\nCandidate answer: {row['answer']}\n"
        "Is the candidate answer correct? Answer yes or no."
    )
    group = f"{idx['paragraph']}-{idx['question']}"
    return Example(f"{group}-{idx['answer']}", prompt, YES_NO, _gold(row), group=group)


def _multirc_scorer(examples: Sequence[Example], predictions: Sequence[int] | Sequence[str]) -> dict[str, float]:
    preds = [int(p) for p in predictions]
    labels = [int(cast(int, e.label)) for e in examples]  # scored examples have their gold label
    scores = multirc_scores(preds, labels, [str(e.group) for e in examples])
    return {**scores, "accuracy": accuracy(preds, labels)}


_MULTIRC_KEYS = ("paragraph", "question", "answer", "idx", "label")
MULTIRC = Task(
    name="multirc",
    kind="classify",
    description="MultiRC: is each candidate answer to a question on a paragraph right (F1a, EM)",
    to_example=_multirc,
    scorer=_multirc_scorer,
    primary_metric="f1a",
    load_local=local_loader(
        "multirc", {"train": "multirc/train.jsonl", "validation": "multirc/val.jsonl"}, _multirc_local
    ),
    load_file=file_loader(_multirc_local),
    hub=HubSource(HUB, "multirc", lambda r: [_pick(r, _MULTIRC_KEYS)]),
    label_names=YES_NO,
)


def _record_local(rec: Row) -> Iterable[Row]:
    """SuperGLUE JSONL, or the original ReCoRD ``dev.json`` entries (``id`` instead of ``idx``)."""
    passage = rec["passage"]
    text = passage["text"]
    # Offsets are inclusive; the Hub's rows hold the sorted set of entity and answer strings.
    entities = sorted({text[e["start"] : e["end"] + 1] for e in passage["entities"]})
    for qa in rec["qas"]:
        yield {
            "passage": text,
            "query": qa["query"],
            "entities": entities,
            "answers": sorted({a["text"] for a in qa.get("answers", [])}),
            "idx": {"passage": rec.get("idx", rec.get("id")), "query": qa.get("idx", qa.get("id"))},
        }


def _record(row: Row) -> Example:
    passage = row["passage"].replace("@highlight\n", "- ")
    query = row["query"].replace("@placeholder", "_____")
    prompt = (
        f"{passage}\n\nQuery: {query}\nWhich entity from the passage fills the blank (_____)? "
        "Answer with the entity only."
    )
    choices = tuple(row["entities"])
    answers = tuple(row["answers"])
    label = next((i for i, c in enumerate(choices) if c in answers), None)
    idx = row["idx"]
    return Example(f"{idx['passage']}-{idx['query']}", prompt, choices, label, references=answers)


def _record_scorer(examples: Sequence[Example], predictions: Sequence[int] | Sequence[str]) -> dict[str, float]:
    texts = [e.choices[int(cast("int | str", p))] for e, p in zip(examples, predictions, strict=True)]
    return qa_scores(texts, [e.references for e in examples])


RECORD = Task(
    name="record",
    kind="classify",
    description="ReCoRD: the entity that fills a cloze query on a news passage (EM, token F1)",
    to_example=_record,
    scorer=_record_scorer,
    primary_metric="em",
    load_local=local_loader(
        "record",
        {"train": "record/fewglue/train.jsonl", "validation": "record/pet-debug/val.jsonl"},
        _record_local,
        notes={
            "train": "record: only the 32 FewGLUE train passages are available locally",
            "validation": "record: only 5 official validation passages (11 queries) are available locally: "
            "a smoke test, not a benchmark",
        },
    ),
    load_file=file_loader(_record_local),
    hub=HubSource(HUB, "record", lambda r: [{k: r[k] for k in ("passage", "query", "entities", "answers", "idx")}]),
    length_norm=True,
)

SUPERGLUE_TASKS: tuple[Task, ...] = (BOOLQ, CB, COPA, RTE, WIC, WSC, MULTIRC, RECORD)
