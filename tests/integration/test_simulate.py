"""``fedsea simulate``: on Flower's Simulation Engine (the default), TLS on; then ``fedsea export``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard

import fedsea
from fedsea.federation.simconfig import releases_per_token

FEDSEA = [sys.executable, "-m", "fedsea.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

RUN = """
[model]
source = "tiny-llama"
[task]
name = "sst2"
train_limit = 32
eval_limit = 8
partition = "dirichlet"
alpha = 1.0
[federation]
clients = 2
rounds = 2
local_steps = 2
mode = "hierarchical"
round_timeout_s = 120
[client]
head_layers = 1
tail_layers = 1
batch_size = 4
max_length = 96
[[clients]]
head_layers = 2
[noise]
relative_sigma = 0.1
[privacy]
head_regularizer = "nopeek"
"""


def test_simulate_writes_a_complete_run_folder_and_exports(tmp_path):
    (tmp_path / "run.toml").write_text(RUN)
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [*FEDSEA, "simulate", str(tmp_path / "run.toml"), "federation.local_steps=3", "--run-dir", str(run_dir),
         "--centralized", "--json"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["rounds_completed"] == 2 and summary["clients"] == 2 and summary["bytes_moved"] > 0
    # One orchestration: the rounds ran on Flower's Simulation Engine (the bug: a native coordinator of its own).
    assert summary["engine"] == "flower"
    rounds = [json.loads(line) for line in (run_dir / "server_rounds.jsonl").read_text().splitlines()]
    assert [r["engine"] for r in rounds] == ["flower", "flower"]
    assert summary["centralized"] is not None and 0 <= summary["after"] <= 1
    for name in ("config.toml", "metrics.jsonl", "report.md", "loss.png", "eval.png", "bytes.png"):
        assert (run_dir / name).is_file(), name
    assert "local_steps = 3" in (run_dir / "config.toml").read_text()  # the override is in the resolved config
    kinds = {json.loads(line)["type"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert kinds == {"round", "step", "traffic", "eval", "centralized", "noise"}
    report = (run_dir / "report.md").read_text()
    assert "client-0 | 2 | 1" in report and "client-1 | 1 | 1" in report and "partition: dirichlet" in report
    assert (run_dir / "secrets" / "tokens.json").stat().st_mode & 0o077 == 0
    # Each client resolved the relative level on its own head (p = 2 and p = 1) and reported it,
    # with the releases of 2 rounds x 3 steps x 4 examples over its shard.
    noise = summary["noise"]
    assert sorted(noise) == ["client-0", "client-1"]
    for name, p in (("client-0", 2), ("client-1", 1)):
        n = noise[name]
        assert n["mode"] == "relative" and n["head_layers"] == p and n["clip_norm"] is None
        assert n["sigma"] == pytest.approx(0.1 * n["rms"]) and n["rms"] > 0 and n["epsilon"] is None
        shard = json.loads((run_dir / "clients" / name / "shard.json").read_text())["ids"]
        assert n["releases"] == releases_per_token(2, 3, 4, len(shard)) and n["summary"] in report
        # The noise seed's secret stays in the client's folder, owner-only.
        secret = run_dir / "clients" / name / "noise.secret"
        assert secret.stat().st_mode & 0o077 == 0 and len(secret.read_text().strip()) == 64
    assert noise["client-0"]["rms"] != noise["client-1"]["rms"]
    assert "head regularizer nopeek (weight 1)" in report

    exported = subprocess.run([*FEDSEA, "export", str(run_dir), str(tmp_path / "merged")], env=ENV,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-2000:]
    merged = fedsea.load_model(tmp_path / "merged")
    base = fedsea.load_model("tiny-llama")
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all("self_attn" in n for n in changed)
    # Its model card (huggingface_hub reads it) says how: the clients' cuts, rounds, clients, noise, data.
    card = ModelCard.load(tmp_path / "merged" / "README.md")
    assert "fedsea" in card.data.tags and "federated-learning" in card.data.tags
    for fact in (
        "| Cut (p, q) | (1, 1), (2, 1) (mixed across clients) |",
        "| Rounds | 2 |",
        "| Clients | 2 |",
        "relative_sigma 0.1",
        "task sst2",
    ):
        assert fact in card.text, fact
