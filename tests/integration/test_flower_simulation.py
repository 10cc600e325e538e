"""fedsea on Flower's Simulation Engine: the ServerApp starts the trunk server, the run file's
clients run as virtual SuperNodes (Ray workers), and every mode trains (the loss goes down) and
leaves the same run folder as ``fedsea simulate``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fedsea.federation.checkpoint import latest_round, load_round

FEDSEA = [sys.executable, "-m", "fedsea.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}

RUN = """
[model]
source = "tiny-llama"
[task]
name = "sst2"
train_limit = 32
eval_limit = 8
[federation]
clients = 2
rounds = 3
local_steps = 3
mode = "{mode}"
round_timeout_s = 300
[optim]
lr = 0.01
[client]
head_layers = 1
tail_layers = 1
batch_size = 4
max_length = 64
[[clients]]
head_layers = 2
[noise]
sigma = 0.0
"""


def _simulate(tmp_path, mode: str, *extra: str) -> tuple[dict, list[dict]]:
    (tmp_path / "run.toml").write_text(RUN.format(mode=mode))
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [*FEDSEA, "flower", "simulate", str(tmp_path / "run.toml"), *extra, "--run-dir", str(run_dir), "--json"],
        env=ENV, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    rounds = [json.loads(line) for line in (run_dir / "server_rounds.jsonl").read_text().splitlines()]
    return summary, rounds


@pytest.fixture(scope="module")
def three_rounds(tmp_path_factory):
    """One 3-round run per mode, shared by the tests of this module (each costs ~20 s)."""
    done: dict[str, tuple[dict, list[dict], object]] = {}

    def run(mode: str) -> tuple[dict, list[dict], object]:
        if mode not in done:
            folder = tmp_path_factory.mktemp(mode)
            done[mode] = (*_simulate(folder, mode), folder / "run")
        return done[mode]

    return run


# Hierarchical mode on the Simulation Engine with clients at different cuts is run by
# test_flower_cut_schedule.py (every block's adapter checked there too), test_flower_engines.py and
# the SecAgg+ and FedAdam tests: not again here (CI time).
@pytest.mark.parametrize("mode", ["sequential", "client-batch"])
def test_a_flower_simulation_trains_in_each_mode(three_rounds, mode):
    summary, rounds, run_dir = three_rounds(mode)
    assert summary["rounds_completed"] == 3 and summary["clients"] == 2 and summary["bytes_moved"] > 0
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["engine"] == "flower" and r["mode"] == mode for r in rounds)
    assert all(sorted(r["submitted"]) == ["client-0", "client-1"] for r in rounds)
    # The loss goes down round after round (each client's mean over its local steps).
    mean = [sum(r["losses"].values()) / len(r["losses"]) for r in rounds]
    assert mean[-1] < mean[0], mean
    for name in ("metrics.jsonl", "report.md", "loss.png"):
        assert (run_dir / name).is_file(), name
    # Every block's adapter moved: head and tail blocks by the clients (through Flower), trunk
    # blocks on the trunk server (staged, trained in the sessions, collected by the ServerApp).
    first = load_round(run_dir / "checkpoints" / "round-0001")[1]
    last_folder = latest_round(run_dir)
    assert last_folder is not None
    number, last, _, _ = load_round(last_folder)
    assert number == 3
    moved = {int(k.split(".")[1]) for k in last if "lora_B" in k and not torch.equal(last[k], first[k])}
    assert moved == {int(k.split(".")[1]) for k in last}, moved  # every block, whichever part trained it
