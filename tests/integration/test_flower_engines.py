"""The same run file on both engines, in hierarchical and client-batch mode: ``fedsea simulate
--engine native`` (fedsea's coordinator) and ``fedsea flower simulate`` (Flower's Simulation
Engine) sample the same clients from the run's seed and leave the same global adapter, bit for
bit, after every round (noise off: each run folder draws its own clients' noise secrets; with
noise on, the runs agree within noise, BENCHMARKS.md).

Why they can agree exactly: the data shards, the initial adapter and each client's data order
and seeds come from the run file's seed; the trunk blocks train in the same trunk-server
sessions; FedAvg is the same float64 weighted mean (``fedsea.flower.strategies.FedAvg64``) over
the replies in the order of the client names. 4 clients with 3 sampled per round give weights
of 1/3, where a float32 mean (Flower's own) differs in the last bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fedsea.federation.checkpoint import load_round
from fedsea.federation.strategy import make_strategy

FEDSEA = [sys.executable, "-m", "fedsea.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}

RUN = """
[model]
source = "tiny-llama"
[task]
name = "sst2"
train_limit = 48
eval_limit = 4
[federation]
clients = 4
fraction = 0.75
rounds = 2
local_steps = 2
mode = "hierarchical"
round_timeout_s = 300
[optim]
lr = 0.01
[client]
head_layers = 1
tail_layers = 1
batch_size = 4
max_length = 48
[noise]
sigma = 0.0
[run]
seed = 7
"""


@pytest.fixture(scope="module", params=["hierarchical", "client-batch"])
def runs(request, tmp_path_factory):
    """The run file in a mode on both engines at once (~30 s): engine -> (run folder, its rounds' records).

    In client-batch mode the 3 sampled clients (one cut) form one group on the trunk server, their
    batches joined in the rows of their names on both engines.
    """
    root = tmp_path_factory.mktemp("engines")
    (root / "run.toml").write_text(RUN.replace('mode = "hierarchical"', f'mode = "{request.param}"'))
    # Both engines at once, a process each with one intra-op thread (two 2-thread processes on 2
    # cores would fight over OpenMP spin-waits): the runs share nothing but the machine, and
    # their results do not depend on timing.
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    procs = {}
    for engine, command in (("native", ["simulate", "--engine", "native"]), ("flower", ["flower", "simulate"])):
        procs[engine] = subprocess.Popen(
            [*FEDSEA, *command, str(root / "run.toml"), "--run-dir", str(root / engine), "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    out = {}
    for engine, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, (engine, stdout[-3000:], stderr[-5000:])
        rounds = [json.loads(line) for line in (root / engine / "server_rounds.jsonl").read_text().splitlines()]
        assert all(r["mode"] == request.param for r in rounds)
        out[engine] = (root / engine, rounds)
    return out


def test_flower_samples_the_clients_the_run_seed_draws_as_the_native_run_does(runs):
    names = [f"client-{i}" for i in range(4)]
    expected = [make_strategy("fedavg", fraction=0.75).select(names, r, seed=7) for r in (1, 2)]
    assert all(len(s) == 3 for s in expected)
    for engine in ("native", "flower"):
        rounds = runs[engine][1]
        assert [r["selected"] for r in rounds] == expected, engine
        assert [sorted(r["submitted"]) for r in rounds] == expected, engine


def test_flower_and_native_runs_leave_the_same_global_adapter_bit_for_bit(runs):
    for r in (1, 2):
        native = load_round(runs["native"][0] / "checkpoints" / f"round-{r:04d}")[1]
        flower = load_round(runs["flower"][0] / "checkpoints" / f"round-{r:04d}")[1]
        assert native.keys() == flower.keys()
        differ = [k for k in native if not torch.equal(native[k], flower[k])]
        assert not differ, (r, len(differ), differ[:3])
    start = load_round(runs["native"][0] / "checkpoints" / "round-0001")[1]
    assert any(not torch.equal(start[k], native[k]) for k in start)  # round 2 trained (the check can fail)
