"""The same task from a local file or a Hugging Face dataset yields the same rows.

``datasets.load_dataset`` is replaced by a fake that serves rows in each Hub dataset's own
schema (written out here by hand from the local records), so the Hub path runs offline.
"""

from __future__ import annotations

import json

import pytest

from fedsea import tasks
from fedsea.tasks.data import find_data_dir, read_jsonl

datasets = pytest.importorskip("datasets")

LABELS = {"rte": ["entailment", "not_entailment"], "cb": ["entailment", "contradiction", "neutral"]}


def _local(path: str, n: int = 5) -> list[dict]:
    return read_jsonl(find_data_dir() / path)[:n]


def _hub_superglue(name: str, rec: dict) -> list[dict]:
    """A local SuperGLUE record as the Hub's ``aps/super_glue`` rows."""
    if name in LABELS:
        return [{**rec, "label": LABELS[name].index(rec["label"])}]
    if name in ("boolq", "wic", "wsc"):
        row = {**rec, "label": int(rec["label"])}
        if name == "wsc":
            row.update(row.pop("target"))
        return [row]
    if name == "multirc":
        p = rec["passage"]
        rows = []
        for q in p["questions"]:
            for a in q["answers"]:
                idx = {"paragraph": rec["idx"], "question": q["idx"], "answer": a["idx"]}
                rows.append({"paragraph": p["text"], "question": q["question"], "answer": a["text"], "idx": idx})
                rows[-1]["label"] = a["label"]
        return rows
    if name == "record":
        text = rec["passage"]["text"]
        entities = sorted({text[e["start"] : e["end"] + 1] for e in rec["passage"]["entities"]})
        spans = {"text": [], "start": [], "end": []}  # the Hub has these too; fedsea drops them
        rows = []
        for qa in rec["qas"]:
            answers = sorted({a["text"] for a in qa["answers"]})
            idx = {"passage": rec["idx"], "query": qa["idx"]}
            rows.append({"passage": text, "query": qa["query"], "entities": entities, "entity_spans": spans})
            rows[-1].update(answers=answers, idx=idx)
        return rows
    return [dict(rec)]


@pytest.fixture
def fake_hub(monkeypatch):
    served: dict[tuple[str, str | None, str], list[dict]] = {}
    calls: list[tuple[str, str | None, str]] = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(served[(path, name, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return served, calls


@pytest.mark.parametrize(
    ("name", "file", "config"),
    [
        ("rte", "rte/val.jsonl", "rte"),
        ("cb", "cb/val.jsonl", "cb"),
        ("copa", "copa/val.jsonl", "copa"),
        ("wic", "wic/val.jsonl", "wic"),
        ("wsc", "wsc/val.jsonl", "wsc.fixed"),
        ("multirc", "multirc/val.jsonl", "multirc"),
        ("record", "record/pet-debug/val.jsonl", "record"),
    ],
)
def test_superglue_local_equals_hub(name, file, config, fake_hub, tmp_path):
    served, calls = fake_hub
    records = _local(file, 2)
    served[("aps/super_glue", config, "validation")] = [r for rec in records for r in _hub_superglue(name, rec)]
    local_file = tmp_path / "slice.jsonl"
    local_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    task = tasks.get_task(name)
    from_file = task.load("validation", source=str(local_file))
    from_hub = task.load("validation", source="hf")
    assert calls == [("aps/super_glue", config, "validation")]
    assert from_hub.source == f"hf:aps/super_glue:{config}/validation"
    assert from_file.rows == from_hub.rows and len(from_hub.rows) >= 2
    assert [task.to_example(r) for r in from_file.rows] == [task.to_example(r) for r in from_hub.rows]


def test_boolq_local_equals_hub(fake_hub, tmp_path):
    served, _ = fake_hub
    records = _local("boolq/fewglue/train.jsonl", 4)
    served[("aps/super_glue", "boolq", "train")] = [_hub_superglue("boolq", r)[0] for r in records]
    path = tmp_path / "boolq.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    boolq = tasks.get_task("boolq")
    assert boolq.load("train", source=str(path)).rows == boolq.load("train", source="hf").rows


def test_xsum_and_sst2_local_equal_hub(fake_hub, tmp_path):
    served, calls = fake_hub
    records = _local("xsum/test.jsonl", 3)  # ids are integers here, strings on the Hub
    served[("EdinburghNLP/xsum", None, "test")] = [{**r, "id": str(r["id"])} for r in records]
    path = tmp_path / "xsum.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    xsum = tasks.get_task("xsum")
    assert xsum.load("test", source=str(path)).rows == xsum.load("test", source="hf").rows
    glue = [{"sentence": "a gorgeous film ", "label": 1, "idx": 0}, {"sentence": "dull ", "label": 0, "idx": 1}]
    served[("nyu-mll/glue", "sst2", "validation")] = glue
    path = tmp_path / "sst2.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in glue))
    sst2 = tasks.get_task("sst2")
    assert sst2.load("validation", source="hf").rows == sst2.load("validation", source=str(path)).rows == glue
    # another Hub dataset by name, with its config
    served[("someone/sst2-copy", "plain", "validation")] = glue
    assert sst2.load("validation", source="hf:someone/sst2-copy:plain").rows == glue
    assert calls[-1] == ("someone/sst2-copy", "plain", "validation")


def test_coqa_official_json_equals_hub(fake_hub, tmp_path):
    served, _ = fake_hub
    story = "Cotton was a white kitten. She lived in a barn."
    official = {
        "version": "1.0",
        "data": [{
            "id": "3dr23u6we5exclen4th8uq9rb42tel", "source": "mctest", "story": story,
            "questions": [{"input_text": "What color was Cotton?", "turn_id": 1},
                          {"input_text": "Where did she live?", "turn_id": 2}],
            "answers": [{"input_text": "white", "span_text": "white kitten", "turn_id": 1},
                        {"input_text": "in a barn", "span_text": "in a barn", "turn_id": 2}],
        }],
    }  # fmt: skip
    path = tmp_path / "coqa-train-v1.0.json"
    path.write_text(json.dumps(official))
    served[("stanfordnlp/coqa", None, "train")] = [
        {
            "source": "mctest",
            "story": story,
            "questions": ["What color was Cotton?", "Where did she live?"],
            "answers": {"input_text": ["white", "in a barn"], "answer_start": [8, 34], "answer_end": [20, 43]},
        }
    ]
    coqa = tasks.get_task("coqa")
    local, hub = coqa.load("train", source=str(path)).rows, coqa.load("train", source="hf").rows
    assert local == hub and len(local) == 2
    assert local[1]["history"] == [["What color was Cotton?", "white"]]
    ex = coqa.to_example(local[1])
    assert "Question: What color was Cotton?\nAnswer: white" in ex.prompt and ex.references == ("in a barn",)
    # the data folder layout: <data>/coqa/coqa-dev-v1.0.json, with the additional answers as references
    (tmp_path / "coqa").mkdir()
    official["data"][0]["additional_answers"] = {"0": [{"input_text": "White"}, {"input_text": "a barn"}]}
    (tmp_path / "coqa" / "coqa-dev-v1.0.json").write_text(json.dumps(official))
    examples, rows = coqa.examples("validation", data_dir=tmp_path)
    assert examples[1].references == ("in a barn", "a barn") and rows.notes


def test_hub_failure_is_a_clear_error(monkeypatch):
    def fail(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(tasks.TaskDataError, match=r"aps/super_glue:rte split 'validation' \(HF_HUB_OFFLINE"):
        tasks.get_task("rte").load("validation", source="hf")
