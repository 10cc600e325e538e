"""The run file's own data per client (issue 16 item 1): ``data`` in ``[[clients]]`` or ``[task]``,
paths resolved against the run file's folder, rows checked without a tokenizer, held-out rows."""

from __future__ import annotations

import json

import pytest

from fedsea.federation.data import check_client_data, holdout_count, load_client_data, split_holdout
from fedsea.federation.simconfig import load_plan
from fedsea.model.load import load_tokenizer

RUN = """
[model]
source = "tiny-llama"
[task]
data = "shared.jsonl"
[federation]
clients = 3
[[clients]]
data = "mine/a.jsonl"
[[clients]]
head_layers = 1
"""


def _write(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_data_paths_are_the_run_files_folders_and_task_data_is_the_default(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "run.toml").write_text(RUN)
    monkeypatch.chdir(tmp_path)
    plan = load_plan("conf/run.toml")
    assert [c.data for c in plan.clients] == [
        str(tmp_path / "conf" / "mine" / "a.jsonl"),
        str(tmp_path / "conf" / "shared.jsonl"),
        str(tmp_path / "conf" / "shared.jsonl"),
    ]
    # an override's relative path is the working folder's
    plan = load_plan("conf/run.toml", ["task.data=other.jsonl"])
    assert plan.clients[2].data == str(tmp_path / "other.jsonl")
    # the resolved config.toml (a resume's) keeps the absolute paths
    from fedsea.federation.simconfig import dump_tree

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.toml").write_text(dump_tree(plan.tree))
    again = load_plan(tmp_path / "elsewhere" / "config.toml")
    assert [c.data for c in again.clients] == [c.data for c in plan.clients]


@pytest.mark.parametrize("holdout", [-0.1, 1.0, float("nan")])
def test_holdout_is_a_share_below_one(holdout):
    with pytest.raises(ValueError, match="holdout"):
        load_plan(None, [f"task.holdout={holdout}" if holdout == holdout else "task.holdout=nan"])


def test_bad_files_name_the_client_and_the_file(tmp_path):
    (tmp_path / "run.toml").write_text(RUN)
    _write(tmp_path / "mine" / "a.jsonl", [{"text": "fine"}, {"prompt": "q", "completion": "a"}])
    _write(tmp_path / "shared.jsonl", [{"text": "fine"}, ["not", "an", "object"]])
    plan = load_plan(tmp_path / "run.toml")
    with pytest.raises(ValueError, match=r"^client-1: data file .*shared\.jsonl: .*shared\.jsonl:2: expected"):
        check_client_data(plan.clients)
    (tmp_path / "shared.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"^client-1: .*holds no examples"):
        check_client_data(plan.clients)
    (tmp_path / "shared.jsonl").unlink()
    with pytest.raises(ValueError, match=r"^client-1: data file .*no data file"):
        check_client_data(plan.clients)
    _write(tmp_path / "shared.jsonl", [{"text": f"row {i}"} for i in range(10)])
    assert check_client_data(plan.clients) == {"client-0": 2, "client-1": 10, "client-2": 10}


def test_held_out_rows_are_the_last_and_join_reads_the_run_files_data(tmp_path):
    assert [holdout_count(n, 0.1) for n in (1, 5, 10, 25)] == [0, 0, 1, 2]
    assert holdout_count(2, 0.9) == 1  # at least one row trains
    train, held = split_holdout(list(range(10)), 0.2)  # type: ignore[arg-type]
    assert (train, held) == (list(range(8)), [8, 9])
    (tmp_path / "run.toml").write_text(RUN)
    _write(tmp_path / "mine" / "a.jsonl", [{"text": f"note {i}"} for i in range(10)])
    plan = load_plan(tmp_path / "run.toml")
    tokenizer = load_tokenizer("tiny-llama")
    me = plan.clients[0]
    # fedsea join --run run.toml --client client-0, with neither --shard nor --data
    assert len(load_client_data(tokenizer, None, None, me.max_length, me, 0.2)) == 8
    # --data still wins, whole file
    assert len(load_client_data(tokenizer, None, str(tmp_path / "mine" / "a.jsonl"), 64, me, 0.2)) == 10
    with pytest.raises(ValueError, match="give exactly one"):
        load_client_data(tokenizer, None, None, 64, plan.clients[0].__class__(), 0.2)


def test_mixed_runs_partition_the_task_across_the_clients_without_a_file(tmp_path):
    from fedsea.federation.simulate import prepare_run, run_data

    _write(tmp_path / "mine" / "a.jsonl", [{"text": f"note {i}"} for i in range(10)])
    (tmp_path / "run.toml").write_text(
        RUN.replace('data = "shared.jsonl"', 'name = "sst2"\ntrain_limit = 20') + "[wire]\ntls = false\n"
    )
    plan = load_plan(tmp_path / "run.toml")
    info = prepare_run(plan, tmp_path / "run")
    shards = [json.loads((tmp_path / "run" / "clients" / c / "shard.json").read_text()) for c in ("client-0",
              "client-1", "client-2")]  # fmt: skip
    assert shards[0] == {"data": str(tmp_path / "mine" / "a.jsonl"), "holdout": 0.1}
    assert all(s["task"] == "sst2" for s in shards[1:]) and sum(len(s["ids"]) for s in shards[1:]) == 20
    assert "a.jsonl" in info["partition"] and sum(info["sizes"]) == 20
    assert run_data(plan).startswith("client-0: its own file a.jsonl; task sst2")


def test_evaluation_and_the_centralized_baseline_score_the_held_out_rows(tmp_path):
    from fedsea.federation.simulate import centralized_baseline, evaluate_state

    for name in ("a", "b"):
        _write(tmp_path / f"{name}.jsonl", [{"text": f"{name} note number {i} of the ward"} for i in range(10)])
    (tmp_path / "run.toml").write_text(
        '[model]\nsource = "tiny-llama"\n[task]\ndata = "a.jsonl"\nholdout = 0.2\n[federation]\nclients = 2\n'
        'rounds = 1\nlocal_steps = 2\n[client]\nhead_layers = 1\ntail_layers = 1\n[[clients]]\ndata = "b.jsonl"\n'
    )
    plan = load_plan(tmp_path / "run.toml")
    tokenizer = load_tokenizer("tiny-llama")
    base = evaluate_state(plan, None, tokenizer)
    assert set(base) == {"heldout_loss", "heldout_loss/client-0", "heldout_loss/client-1"}  # no task metric
    assert base["heldout_loss"] == pytest.approx((base["heldout_loss/client-0"] + base["heldout_loss/client-1"]) / 2)
    central = centralized_baseline(plan, tokenizer)
    assert central["steps"] == 4 and set(central["metrics"]) == set(base)
