"""Cut schedules on Flower: a client's (p, q) moves between rounds and no training is lost.

A 6-block tiny model (so that (4, 1) fits); two clients, hierarchical mode, noise off. client-0
moves from (2, 2) to (4, 1) in round 2 and back to (2, 2) in round 3; the same run with its cut
fixed must end with the same global adapter, to float tolerance. Why the math makes them equal:

- with no noise a split step is the centralized step (the project's first invariant): the loss
  and every LoRA gradient are the same wherever the cut is;
- in hierarchical mode each client trains from the round's global adapter alone (its own trunk
  adapter, staged from the global), so a client's round is the same function of the global
  wherever it cuts;
- the optimizers restart every round (``FederatedClient._start_round`` on the client, the stage's
  load on the trunk server), and AdamW is elementwise with the same settings on both sides: a
  block's LoRA takes the same steps on the client and on the trunk server;
- per-part gradient clipping would clip over other blocks at another cut: it is off here
  (``optim.max_grad_norm = 0``); the data order and seeds are the client's and the round's;
- FedAvg averages every block over the clients' whole-model replies (head/tail from the client,
  trunk from the trunk server), whichever party trained it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fedsea
from fedsea.federation.checkpoint import latest_round, load_round

FEDSEA = [sys.executable, "-m", "fedsea.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}

RUN = """
[model]
source = "{model}"
[task]
name = "sst2"
train_limit = 32
eval_limit = 4
[federation]
clients = 2
rounds = 3
local_steps = 2
mode = "hierarchical"
round_timeout_s = 300
[optim]
lr = 0.01
max_grad_norm = 0
[client]
head_layers = 2
tail_layers = 2
batch_size = 4
max_length = 48
[noise]
sigma = 0.0
"""
MOVES = "[[clients]]\ncuts = [[2, 4, 1], [3, 2, 2]]\n"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-block tiny model folder (``tiny-llama`` has 4 blocks: too few for (4, 1))."""
    folder = tmp_path_factory.mktemp("model") / "tiny6"
    fedsea.tiny_llama(num_layers=6).save_pretrained(folder)
    fedsea.tiny_tokenizer().save_pretrained(folder)
    return folder


def _run_file(folder: Path, model: Path, extra: str = "") -> Path:
    path = folder / "run.toml"
    path.write_text(RUN.format(model=model) + extra)
    return path


def _simulate(run_file: Path, run_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FEDSEA, "flower", "simulate", str(run_file), "--run-dir", str(run_dir), "--json", *flags],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    folder = latest_round(run_dir)
    assert folder is not None
    number, state, _, _ = load_round(folder)
    assert number == 3
    return state


def _in_process(tmp_path: Path, model: Path, name: str, nodes: list[dict], extra: str = "", **config: object) -> Path:
    from tests.integration.flower_inprocess import run_in_process

    folder = tmp_path / name
    folder.mkdir()
    run_in_process(_run_file(folder, model, extra), folder / "run", nodes, **config)
    return folder / "run"


def test_moving_a_cut_and_back_loses_no_training(tmp_path: Path, model: Path) -> None:
    # The moving run on the Simulation Engine; the fixed one in this process (the same ServerApp
    # and ClientApp over ``InProcessGrid``: bit for bit the Simulation Engine's global adapter, and
    # ~20 s less than a second Ray run).
    (tmp_path / "moved").mkdir()
    done = _simulate(_run_file(tmp_path / "moved", model, MOVES), tmp_path / "moved" / "run")
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    moved_dir = tmp_path / "moved" / "run"
    fixed_dir = _in_process(tmp_path, model, "fixed", [{"partition-id": 0}, {"partition-id": 1}])
    records = [json.loads(x) for x in (moved_dir / "server_rounds.jsonl").read_text().splitlines()]
    # The round records say where each client cut, round by round.
    assert [r["cuts"]["client-0"] for r in records] == [[2, 2], [4, 1], [2, 2]]
    assert [r["cuts"]["client-1"] for r in records] == [[2, 2]] * 3
    assert all(r["cuts-moved"] for r in records)
    # Each round client-0 trained at that round's cut (its traffic record says which), with its noise
    # calibrated at that p: a re-split writes a noise record with the round and cut, a participant
    # built afresh in another worker of the simulation one at the cut it is built at. (Which worker
    # serves a round is Ray's choice: a worker that kept a participant at the round's cut writes none.)
    log = [json.loads(x) for x in (moved_dir / "clients" / "client-0" / "steps.jsonl").read_text().splitlines()]
    trained_at = {r["round"]: tuple(r["cut"]) for r in log if "bytes_sent" in r}
    assert trained_at == {1: (2, 2), 2: (4, 1), 3: (2, 2)}, trained_at
    rms = {}
    for r in log:
        if "noise" in r:
            rms[r["noise"]["head_layers"]] = r["noise"]["rms"]  # h_p's RMS at that p (relative_sigma's scale)
            assert r["noise"]["sigma"] == 0.0
    assert set(rms) == {2, 4} and rms[4] != rms[2], rms
    fixed, moved = _final(fixed_dir), _final(moved_dir)
    start = load_round(fixed_dir / "checkpoints" / "round-0001")[1]
    assert fixed.keys() == moved.keys()
    # Blocks 2 and 3 were client-0's head in round 2, its trunk in rounds 1 and 3; block 4 its trunk in round 2.
    worst = max(float((fixed[k] - moved[k]).abs().max()) for k in fixed)
    assert worst < 1e-5, worst
    assert any(not torch.equal(fixed[k], start[k]) for k in fixed)  # rounds 2 and 3 trained: the check can fail
    # Every block's adapter moved (LoRA B starts at zero), whichever part trained it: the head and
    # tail through Flower, the trunk on the trunk server, with clients at different cuts.
    assert all(bool(moved[k].abs().sum() > 0) for k in moved if "lora_B" in k)


# -- the run file's schedule, checked in the parent before anything starts ---------------------
@pytest.mark.parametrize(
    ("cuts", "flags", "expected"),
    [
        (
            "[[4, 4, 1]]",
            [],
            "client-0 cuts entry [4, 4, 1]: round 4 is after the run's last round (federation.rounds = 3)",
        ),
        ("[[2, 4, 2]]", [], "client-0 round 2 cut (4, 2) on "),  # 4 + 2 blocks of 6 leave no trunk
        ("[[0, 4, 1]]", [], "clients[0].cuts entry [0, 4, 1]: round 0 must be >= 1"),
        ("[[3, 4, 1], [2, 2, 2]]", [], "round 2 comes after round 3; list the entries once per round"),
        ("[[2, 4]]", [], "clients[0].cuts[0] must be a list of 3, got [2, 4]"),
        ("{ 2 = [4, 1] }", [], "clients[0].cuts must be a list"),  # a table: the list of [round, p, q] it is
        (
            "[[2, 4, 1]]",
            ["--engine", "native"],
            "client-0 cuts moves its cut to (4, 1) in round 2, but the native engine",
        ),
        (
            "[[2, 4, 1]]",
            ["--secure-aggregation"],
            "every client needs the same cut (p, q) in round 2: client-0 has (4, 1)",
        ),
    ],
)
def test_a_bad_schedule_is_one_line_before_anything_starts(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str], cuts: str, flags: list[str], expected: str
) -> None:
    from fedsea.cli.main import main

    run_file = _run_file(tmp_path, model, f"[[clients]]\ncuts = {cuts}\n")
    run_dir = tmp_path / "run"
    assert main(["simulate", str(run_file), "--run-dir", str(run_dir), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedsea: error: ") and expected in err[0], err
    assert not run_dir.exists()  # refused before any folder, server or client


def test_a_schedule_that_moves_every_client_together_passes_secure_aggregation(tmp_path: Path, model: Path) -> None:
    from fedsea.federation.simconfig import load_plan
    from fedsea.flower.secagg import check_plan

    plan = load_plan(_run_file(tmp_path, model), ["client.cuts=[[2, 4, 1]]", "federation.mode=hierarchical"])
    check_plan(plan, "fedavg")  # one cut for all in every round: (2, 2), then (4, 1)
    assert [c.cut_at(2) for c in plan.clients] == [(4, 1), (4, 1)]


def test_a_resolved_run_file_keeps_a_setting_turned_off(tmp_path: Path, model: Path) -> None:
    # The Flower apps read the run folder's resolved config.toml: ``max_grad_norm = 0`` (per-part
    # clipping off, which moving cuts need for an exact match) came back as the default 1.0.
    from fedsea.federation.simconfig import dump_tree, load_plan

    plan = load_plan(_run_file(tmp_path, model), ["task.train_limit=0", "federation.max_update_rms=0"])
    (tmp_path / "config.toml").write_text(dump_tree(plan.tree))
    again = load_plan(tmp_path / "config.toml")
    assert again.optim.max_grad_norm is None and again.fed.max_update_rms is None
    assert again.config.task.train_limit is None and again.tree == plan.tree


# -- a client asks for its own schedule (node config ``cuts``) --------------------------------
def test_a_client_moves_its_own_cut_through_its_node_config(tmp_path: Path, model: Path) -> None:
    plain = [{"partition-id": 0}, {"partition-id": 1}]
    fixed = _in_process(tmp_path, model, "fixed", plain)
    asked = [{"partition-id": 0}, {"partition-id": 1, "cuts": "[[2, 4, 1], [3, 2, 2]]"}]
    moved = _in_process(tmp_path, model, "moved", asked)
    records = [json.loads(x) for x in (moved / "server_rounds.jsonl").read_text().splitlines()]
    assert [r["cuts"]["client-1"] for r in records] == [[2, 2], [4, 1], [2, 2]]
    assert [r["cuts"]["client-0"] for r in records] == [[2, 2]] * 3
    # One process: the participant re-split at each move, logging the round, the cut and the noise at its p.
    log = [json.loads(x) for x in (moved / "clients" / "client-1" / "steps.jsonl").read_text().splitlines()]
    assert [(r["round"], r["cut"], r["noise"]["head_layers"]) for r in log if "cut" in r and "noise" in r] == [
        (2, [4, 1], 4),
        (3, [2, 2], 2),
    ]
    a, b = _final(fixed), _final(moved)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5  # the node's move lost no training either


def test_a_node_schedule_that_conflicts_with_the_run_file_is_refused(tmp_path: Path, model: Path) -> None:
    nodes = [{"partition-id": 0, "cuts": "[[2, 4, 1]]"}, {"partition-id": 1, "cuts": "[[3, 4, 1]]"}]
    # client-0's run-file schedule is the same list (fine); client-1's node asks in round 3 what
    # the run file says for round 2: refused, and the run goes on with client-0.
    extra = "[[clients]]\ncuts = [[2, 4, 1]]\n[[clients]]\ncuts = [[2, 4, 1]]\n"
    run_dir = _in_process(tmp_path, model, "conflict", nodes, extra, **{"set": "federation.min_clients=1"})
    records = [json.loads(x) for x in (run_dir / "server_rounds.jsonl").read_text().splitlines()]
    assert all(r["submitted"] == ["client-0"] for r in records)
    assert [r["cuts"]["client-0"] for r in records] == [[2, 2], [4, 1], [4, 1]]
    why = records[0]["failed"]["node 2"]
    assert "client-1: node config cuts [[3, 4, 1]] conflicts with the run file's cuts [[2, 4, 1]]" in why, why


def test_secure_aggregation_refuses_a_node_that_moves_its_cut(tmp_path: Path, model: Path) -> None:
    from fedsea.errors import FedseaError

    nodes = [{"partition-id": 0, "cuts": "[[2, 4, 1]]"}, {"partition-id": 1, "cuts": "[[2, 4, 1]]"}]
    with pytest.raises(FedseaError, match="moves the cut, but secure aggregation needs one cut for all clients"):
        _in_process(tmp_path, model, "secure", nodes, **{"secure-aggregation": True})


def test_client_batch_groups_follow_each_rounds_cut(tmp_path: Path, model: Path) -> None:
    # Rounds 1 and 3: one group [2, 4) of both clients; round 2: client-0 alone in [4, 5), client-1
    # alone in [2, 4). A group keyed by the run file's cut would stage client-0 in the wrong group
    # (its session's trunk blocks are not the group's) and the round would fail.
    folder = tmp_path / "batched"
    folder.mkdir()
    run_file = _run_file(folder, model, MOVES)
    run_file.write_text(run_file.read_text().replace('mode = "hierarchical"', 'mode = "client-batch"'))
    done = _simulate(run_file, folder / "run")
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    records = [json.loads(x) for x in (folder / "run" / "server_rounds.jsonl").read_text().splitlines()]
    assert all(r["mode"] == "client-batch" and sorted(r["submitted"]) == ["client-0", "client-1"] for r in records)
    assert all(not r["refused"] and not r["failed"] for r in records), records
    assert [r["cuts"]["client-0"] for r in records] == [[2, 2], [4, 1], [2, 2]]


def test_sequential_mode_moves_a_cut_without_losing_training(tmp_path: Path, model: Path) -> None:
    # One client: the chain is that client alone, so the moved run must equal the fixed one. (With
    # more clients sequential mode passes the trunk blocks down the chain, and a block a client
    # moved into its head is not passed on: the chain itself depends on the cuts.)
    one = {"set": "federation.clients=1;federation.mode=sequential"}
    fixed = _in_process(tmp_path, model, "fixed", [{"partition-id": 0}], **one)
    moved = _in_process(tmp_path, model, "moved", [{"partition-id": 0}], MOVES, **one)
    records = [json.loads(x) for x in (moved / "server_rounds.jsonl").read_text().splitlines()]
    assert [r["cuts"] for r in records] == [{"client-0": c} for c in ([2, 2], [4, 1], [2, 2])]
    assert all(r["mode"] == "sequential" for r in records)
    a, b = _final(fixed), _final(moved)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
