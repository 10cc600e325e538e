"""Helpers of the ``fedsea simulate`` fault tests: a tiny run as a subprocess, and SIGKILL of one
of its processes (``pids.json`` in the run folder lists them) at a chosen point of the run.

Killing one client's or the server's process is the native engine's fault (``--engine native``:
a process per party); on Flower's Simulation Engine the trunk server and the ServerApp share the
``fedsea simulate`` process and the clients share Ray workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

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


def start(tmp_path: Path, clients: int, *extra: str, engine: str = "native") -> tuple[subprocess.Popen[str], Path]:
    (tmp_path / "run.toml").write_text(RUN.format(clients=clients))
    run_dir = tmp_path / "run"
    argv = [*FEDSEA, "simulate", str(tmp_path / "run.toml"), *extra, "--run-dir", str(run_dir), "--json"]
    argv += ["--engine", engine]
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
