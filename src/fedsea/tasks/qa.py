"""Conversational question answering: CoQA and QuAC (greedy generation, EM and token F1).

Canonical rows:
- ``coqa``: one row per dialog turn, ``{"id", "story", "history": [[question, answer], ...],
  "question", "answer", "additional_answers"}``, from the official JSON or the Hub (whose
  rows have no additional answers). Not in the local data folder: ``quac`` stands in offline.
- ``quac``: the MosaicML ICL rows ``{"id", "context", "answer", "aliases"}`` (the context
  already holds the passage and the dialog history), split here 80/20 (seeded).

Both are scored against every acceptable answer (the best one counts), with the official
normalization (``fedsea.tasks.metrics.normalize_answer``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from fedsea.tasks.base import Example, HubSource, Task
from fedsea.tasks.data import Holdout, Row, TaskDataError, digest, file_loader, local_loader
from fedsea.tasks.metrics import qa_scores


def _coqa_official(rec: Row) -> Iterable[Row]:
    """One story of the official CoQA JSON -> one row per turn."""
    story = rec["story"]
    extra = rec.get("additional_answers", {})
    history: list[list[str]] = []
    for turn, (q, a) in enumerate(zip(rec["questions"], rec["answers"], strict=True)):
        if "input_text" not in q:  # a Hub row passed by mistake
            raise TaskDataError("coqa: expected the official JSON (questions as objects with input_text)")
        others = [answers[turn]["input_text"] for answers in extra.values() if turn < len(answers)]
        yield {
            "id": f"{digest(story)}-{turn + 1}",
            "story": story,
            "history": [list(h) for h in history],
            "question": q["input_text"],
            "answer": a["input_text"],
            "additional_answers": others,
        }
        history.append([q["input_text"], a["input_text"]])


def _coqa_hub(rec: Row) -> Iterable[Row]:
    """One Hub row (``questions`` and ``answers.input_text`` as lists) -> one row per turn."""
    story, answers = rec["story"], rec["answers"]["input_text"]
    for turn, (q, a) in enumerate(zip(rec["questions"], answers, strict=True)):
        history = [[hq, ha] for hq, ha in zip(rec["questions"][:turn], answers[:turn], strict=True)]
        yield {
            "id": f"{digest(story)}-{turn + 1}",
            "story": story,
            "history": history,
            "question": q,
            "answer": a,
            "additional_answers": [],
        }


def _coqa(row: Row) -> Example:
    turns = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in row["history"])
    prompt = f"{row['story']}\n\n{turns}Question: {row['question']}\n\nAnswer the last question briefly."
    return Example(row["id"], prompt, references=(row["answer"], *row["additional_answers"]))


def _qa_scorer(examples: Sequence[Example], predictions: Sequence[int] | Sequence[str]) -> dict[str, float]:
    return qa_scores([str(p) for p in predictions], [e.references for e in examples])


COQA = Task(
    name="coqa",
    kind="generate",
    description="CoQA: conversational QA on a story (EM, F1); official JSON or the Hub",
    to_example=_coqa,
    scorer=_qa_scorer,
    primary_metric="f1",
    load_local=local_loader(
        "coqa",
        {"train": "coqa/coqa-train-v1.0.json", "validation": "coqa/coqa-dev-v1.0.json"},
        _coqa_official,
        notes={"validation": "coqa: scored against the answer and the additional answers"},
    ),
    load_file=file_loader(_coqa_official),
    hub=HubSource("stanfordnlp/coqa", None, _coqa_hub),
    max_new_tokens=24,
)


def _quac_norm(rec: Row) -> Iterable[Row]:
    yield {
        "id": rec.get("id") or digest(rec["context"]),
        "context": rec["context"],
        "answer": rec["answer"],
        "aliases": list(rec.get("aliases", [])),
    }


def _quac(row: Row) -> Example:
    prompt = (
        f"{row['context']}\n\nAnswer the last question with a short span copied from the text, "
        "or with CANNOTANSWER if the text does not say."
    )
    return Example(row["id"], prompt, references=(row["answer"], *row["aliases"]))


QUAC = Task(
    name="quac",
    kind="generate",
    description="QuAC: conversational QA with dialog history (EM, F1); stands in for CoQA offline",
    to_example=_quac,
    scorer=_qa_scorer,
    primary_metric="f1",
    load_local=local_loader("quac", {}, _quac_norm, holdout=Holdout("quac/quac.jsonl", 0.2, 0)),
    load_file=file_loader(_quac_norm),
    max_new_tokens=32,
)

QA_TASKS: tuple[Task, ...] = (COQA, QUAC)
