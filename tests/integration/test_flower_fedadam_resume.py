"""FedAdam's server state (its moments m_t, v_t) is checkpointed with each round and restored by
``--resume``: a run stopped after round 1 and resumed repeats the uninterrupted run bit for bit.
Without the moments the resumed round 2 would restart Adam (m = v = 0) and land elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from fedsea.federation.checkpoint import load_round

FEDSEA = [sys.executable, "-m", "fedsea.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}

RUN = """
[model]
source = "tiny-llama"
[task]
name = "sst2"
train_limit = 24
eval_limit = 4
[federation]
clients = 2
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
"""


def _flower(*args: str) -> None:
    done = subprocess.run(
        [*FEDSEA, "flower", "simulate", *args, "--strategy", "fedadam", "--json"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])


def test_a_resumed_fedadam_run_keeps_its_moments_and_repeats_the_uninterrupted_run(tmp_path):
    from tests.integration.flower_inprocess import run_in_process

    (tmp_path / "run.toml").write_text(RUN)
    # The uninterrupted run over the in-process grid: bit for bit the Simulation Engine's (see
    # tests/integration/test_flower_cut_schedule.py), without a third Ray start.
    run_in_process(tmp_path / "run.toml", tmp_path / "whole", [{"partition-id": 0}, {"partition-id": 1}],
                   strategy="fedadam")  # fmt: skip
    _flower(str(tmp_path / "run.toml"), "federation.rounds=1", "--run-dir", str(tmp_path / "part"))
    _flower("federation.rounds=2", "--resume", str(tmp_path / "part"))

    # The moments are in the round's folder, as safetensors (one m and one v per adapter tensor).
    first = tmp_path / "part" / "checkpoints" / "round-0001"
    moments = load_file(str(first / "optim-strategy.safetensors"))
    adapter = load_round(first)[1]
    assert len(moments) == 2 * len(adapter) and any(bool(t.abs().sum() > 0) for t in moments.values())
    assert json.loads((first / "state.json").read_text())["optimizers"]["strategy"]["param_groups"][0]["eta"] == 1e-2

    whole = load_round(tmp_path / "whole" / "checkpoints" / "round-0002")[1]
    resumed = load_round(tmp_path / "part" / "checkpoints" / "round-0002")[1]
    assert whole.keys() == resumed.keys()
    differ = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not differ, (len(differ), differ[:3])  # bit for bit
    assert any(not torch.equal(adapter[k], whole[k]) for k in adapter)  # round 2 moved the adapter
