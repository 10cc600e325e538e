"""Secure aggregation (SecAgg+) on Flower's Simulation Engine: the same one-round run with and
without it, from the same start, gives the same global adapter within the quantization error; the
ServerApp received masked vectors only; a run with mixed cuts is refused naming them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from fedsea.federation.checkpoint import load_round
from fedsea.flower.secagg import CLIPPING_RANGE, QUANTIZATION_RANGE, error_bound

FEDSEA = [sys.executable, "-m", "fedsea.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}

RUN = """
[model]
source = "tiny-llama"
[task]
name = "sst2"
train_limit = 16
eval_limit = 4
[federation]
clients = 2
rounds = 1
local_steps = 2
mode = "hierarchical"
round_timeout_s = 300
[optim]
lr = 0.01
[client]
head_layers = 1
tail_layers = 1
batch_size = 4
max_length = 64
[noise]
sigma = 0.0
"""


def _simulate(tmp_path, name: str, run: str, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "run.toml").write_text(run)
    return subprocess.run(
        [*FEDSEA, "flower", "simulate", str(tmp_path / "run.toml"), "--run-dir", str(tmp_path / name), "--json",
         *extra],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _head_tail(state: dict[str, torch.Tensor]) -> list[str]:
    last = max(int(k.split(".")[1]) for k in state)
    return sorted(k for k in state if int(k.split(".")[1]) in (0, last))  # (p, q) = (1, 1)


def test_secure_aggregation_equals_fedavg_within_the_quantization_error(tmp_path):
    from tests.integration.flower_inprocess import run_in_process

    done = _simulate(tmp_path, "secure", RUN, "--secure-aggregation")
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-5000:])
    # The plain FedAvg run: the same ServerApp and ClientApps over the in-process grid, which gives
    # the Simulation Engine's global adapter bit for bit (tests/integration/test_flower_cut_schedule.py)
    # at a fraction of a second Ray run's time.
    run_in_process(tmp_path / "run.toml", tmp_path / "plain", [{"partition-id": 0}, {"partition-id": 1}])
    plain = load_round(tmp_path / "plain" / "checkpoints" / "round-0001")[1]
    secure = load_round(tmp_path / "secure" / "checkpoints" / "round-0001")[1]
    rounds = [json.loads(line) for line in (tmp_path / "secure" / "server_rounds.jsonl").read_text().splitlines()]
    record = rounds[0]
    assert sorted(record["submitted"]) == ["client-0", "client-1"]
    sa = record["secure-aggregation"]
    # The ServerApp received the protocol's four stages from each client, every reply checked to
    # carry no array (fedsea.flower.secagg._Watch raises otherwise): masked vectors only.
    assert sa["replies"] == 4 * 2 and sa["failures"] == 0
    assert (sa["clipping-range"], sa["quantization-range"]) == (CLIPPING_RANGE, QUANTIZATION_RANGE)
    # Tolerance: each client's weighted update is within one quantization step 2c/T of its value,
    # the weights n_i/W are rounded to 1/T: |secure - FedAvg| <= 2 * 2c n W / (T sum n) (+1e-6 of
    # float32 rounding); two clients of 8 samples, W = 8, c = 1, T = 2**22: about 3e-6.
    weights = list(record["samples"].values())
    bound = error_bound(weights, sa["max-weight"])
    assert bound == sa["error-bound"] and bound < 1e-5
    keys = _head_tail(plain)
    assert keys and set(plain) == set(secure)
    diff = max((plain[k].float() - secure[k].float()).abs().max().item() for k in keys)
    assert diff <= bound, (diff, bound)
    # The clients trained (same losses: the runs are the same but for the aggregation), and the
    # head/tail moved from the start far more than the tolerance, so the comparison is not vacuous.
    plain_round = json.loads((tmp_path / "plain" / "server_rounds.jsonl").read_text().splitlines()[0])
    assert record["losses"] == plain_round["losses"]
    start = _start(tmp_path / "secure")
    moved = max((secure[k].float() - start[k].float()).abs().max().item() for k in keys)
    assert moved > 100 * bound, (moved, bound)
    # The trunk adapters (seen by the trunk server anyway) are averaged as without secure aggregation.
    trunk = [k for k in plain if k not in keys]
    assert all(torch.allclose(plain[k].float(), secure[k].float(), atol=1e-6) for k in trunk)


def _start(run_dir) -> dict[str, torch.Tensor]:
    """The run's initial global adapter (as the ServerApp draws it from the run's seed)."""
    from fedsea.federation.initial import initial_global_state
    from fedsea.federation.simconfig import load_plan
    from fedsea.model.load import load_model
    from fedsea.server.trunk import TrunkHost

    plan = load_plan(str(run_dir / "config.toml"), ())
    model = plan.config.server_model()
    return initial_global_state(TrunkHost(load_model(model.source, dtype=model.dtype, device="cpu")), plan.fed)


def test_secure_aggregation_refuses_mixed_cuts_naming_them(tmp_path):
    done = _simulate(tmp_path, "mixed", RUN + "[[clients]]\nhead_layers = 2\n", "--secure-aggregation")
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-3000:])
    assert "(2, 1)" in done.stderr and "(1, 1)" in done.stderr and "same cut" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "mixed" / "checkpoints").exists()
