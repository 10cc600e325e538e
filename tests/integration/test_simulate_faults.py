"""``fedsea simulate`` when a process dies: a lost client, a lost server, a server that cannot start.

Real processes: ``fedsea simulate`` runs as a subprocess, starts ``fedsea serve`` and the
``fedsea join`` clients, and lists their process ids in ``pids.json``; the tests kill one of
them with SIGKILL at a chosen point of the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import fedsea

FEDSEA = [sys.executable, "-m", "fedsea.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

RUN = """
[model]
source = "tiny-llama"
[task]
name = "sst2"
train_limit = 24
eval_limit = 4
[federation]
clients = {clients}
rounds = 3
local_steps = 3
mode = "hierarchical"
round_timeout_s = 6
[client]
head_layers = 1
tail_layers = 1
batch_size = 4
max_length = 64
[wire]
latency_ms = 15
[noise]
relative_sigma = 0.1
"""


def start(tmp_path: Path, clients: int, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    (tmp_path / "run.toml").write_text(RUN.format(clients=clients))
    run_dir = tmp_path / "run"
    argv = [*FEDSEA, "simulate", str(tmp_path / "run.toml"), *extra, "--run-dir", str(run_dir), "--json"]
    return subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), run_dir


def steps(run_dir: Path, client: str) -> list[dict[str, object]]:
    path = run_dir / "clients" / client / "steps.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in (json.loads(x) for x in lines if x.strip().endswith("}")) if "loss" in r]


def kill_when(run_dir: Path, who: str, ready: Callable[[], bool], timeout: float = 240) -> None:
    """SIGKILL ``who`` (a name in ``pids.json``) once ``ready()``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "pids.json").exists() and ready():
            os.kill(json.loads((run_dir / "pids.json").read_text())[who], signal.SIGKILL)
            return
        time.sleep(0.05)
    raise AssertionError(f"never ready to kill {who}")


def test_a_lost_client_is_a_warning_and_the_run_still_reports(tmp_path):
    sim, run_dir = start(tmp_path, 3)
    kill_when(run_dir, "client-2", lambda: len(steps(run_dir, "client-2")) >= 1)
    out, err = sim.communicate(timeout=400)
    # The bug: exit 1 with a traceback and no report until --resume.
    assert sim.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert "fedsea: warning: client-2 was lost (killed by SIGKILL)" in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["rounds_completed"] == 3 and summary["lost_clients"] == {"client-2": "killed by SIGKILL"}
    assert "client-2 (killed by SIGKILL)" in (run_dir / "report.md").read_text()
    rounds = [json.loads(x) for x in (run_dir / "server_rounds.jsonl").read_text().splitlines()]
    assert "client-2" in rounds[0]["dropped"] and rounds[-1]["submitted"] == ["client-0", "client-1"]
    assert not (run_dir / "FAILED").exists() and not (run_dir / "pids.json").exists()


def test_a_lost_server_is_one_line_then_resume_finishes_without_duplicates(tmp_path):
    sim, run_dir = start(tmp_path, 2)

    def in_round_two() -> bool:  # round 1 checkpointed and round 2 under way
        started = any(s["round"] == 2 for s in steps(run_dir, "client-0"))
        return started and (run_dir / "checkpoints" / "LATEST").exists()

    kill_when(run_dir, "server", in_round_two)
    _, err = sim.communicate(timeout=300)
    # The bug: exit 1 and a traceback. Now one line that says how to go on; the folder stays.
    assert sim.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("fedsea: error:")]
    assert len(lines) == 1 and "server was lost (killed by SIGKILL)" in lines[0], err[-2000:]
    assert f"fedsea simulate --resume {run_dir}" in lines[0]
    assert (run_dir / "FAILED").read_text().startswith("the server was lost")
    before = {c: steps(run_dir, c) for c in ("client-0", "client-1")}
    assert any(s["round"] == 2 for s in before["client-0"])  # steps of the round that was lost

    done = subprocess.run([*FEDSEA, "simulate", "--resume", str(run_dir), "--json"], env=ENV,
                          capture_output=True, text=True, timeout=400)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["rounds_completed"] == 3 and not (run_dir / "FAILED").exists()
    for client in ("client-0", "client-1"):
        keys = [(s["round"], s["step"]) for s in steps(run_dir, client)]
        # The bug: the lost round's steps stayed and were logged again.
        assert sorted(keys) == [(r, s) for r in (1, 2, 3) for s in range(3)], (client, keys)
    # The bytes of the whole run, not of the resumed part alone: at least every round's traffic.
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    traffic = [r for r in records if r["type"] == "traffic"]
    assert sorted((t["client"], t["round"]) for t in traffic) == [(c, r) for c in ("client-0", "client-1")
                                                                  for r in (1, 2, 3)]  # fmt: skip
    assert summary["bytes_moved"] >= sum(t["bytes_sent"] + t["bytes_received"] for t in traffic)


def test_a_server_that_cannot_start_leaves_no_half_made_folder(tmp_path):
    # A model folder whose config reads but whose weights are garbage: the server fails to load it.
    model = tmp_path / "model"
    fedsea.tiny_llama().save_pretrained(model)
    fedsea.tiny_tokenizer().save_pretrained(model)
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    sim, run_dir = start(tmp_path, 2, f'model.source="{model}"')
    _, err = sim.communicate(timeout=300)
    assert sim.returncode == 2 and "Traceback" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("fedsea: error:")]
    assert len(lines) == 1 and "the server did not start" in lines[0] and "cannot load the model" in lines[0]
    assert "removed the half-made run folder" in lines[0]
    assert not run_dir.exists()  # the bug: config, secrets and shards stayed behind
