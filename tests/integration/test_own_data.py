"""Each client trains on its own JSONL file named in the run file (issue 16 item 1): a Flower
simulation on three different files lowers each client's held-out loss, and a bad file is
refused in the parent before any process or folder is made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

FEDSEA = [sys.executable, "-m", "fedsea.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}

RUN = """
[model]
source = "tiny-llama"
[task]
holdout = 0.2
[federation]
clients = 3
rounds = 2
local_steps = 4
round_timeout_s = 300
[optim]
lr = 0.01
[client]
head_layers = 1
tail_layers = 1
batch_size = 4
max_length = 48
[[clients]]
data = "notes/a.jsonl"
[[clients]]
data = "notes/b.jsonl"
[[clients]]
data = "{c}"
[noise]
sigma = 0.0
"""


def _notes(folder) -> None:
    """Three hospitals' notes: three different files, text rows and prompt/completion rows."""
    (folder / "notes").mkdir()
    a = [{"text": f"Patient {i} was admitted with a fever and discharged after two days."} for i in range(10)]
    b = [{"prompt": f"Ward {i} report:", "completion": " all beds clean, no infections today."} for i in range(10)]
    c = [{"text": f"Blood pressure {120 + i} over 80, pulse regular, no medication change."} for i in range(10)]
    for name, rows in (("a", a), ("b", b), ("c", c)):
        (folder / "notes" / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_three_clients_train_on_their_own_files(tmp_path):
    _notes(tmp_path)
    # client-2's file by an absolute path, the others relative to the run file's folder
    (tmp_path / "run.toml").write_text(RUN.format(c=tmp_path / "notes" / "c.jsonl"))
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [*FEDSEA, "simulate", str(tmp_path / "run.toml"), "--run-dir", str(run_dir), "--json"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["engine"] == "flower" and summary["rounds_completed"] == 2
    assert summary["metric"] == "heldout_loss" and summary["after"] < summary["before"], summary
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("type") == "eval"]
    for name in ("client-0", "client-1", "client-2"):
        assert evals[-1][f"heldout_loss/{name}"] < evals[0][f"heldout_loss/{name}"], (name, evals)
    # each client trained on its own file: 8 rows of 10 (2 held out), read from its shard
    for name, file in (("client-0", "a"), ("client-1", "b"), ("client-2", "c")):
        shard = json.loads((run_dir / "clients" / name / "shard.json").read_text())
        assert shard == {"data": str(tmp_path / "notes" / f"{file}.jsonl"), "holdout": 0.2}
    report = (run_dir / "report.md").read_text()
    assert "a.jsonl" in report and "b.jsonl" in report and "c.jsonl" in report
    assert "## Evaluation (heldout_loss, each client's held-out rows" in report and summary["task"] == "own data"


def test_a_bad_data_file_is_refused_before_anything_starts(tmp_path, capsys):
    from fedsea.cli.main import main

    _notes(tmp_path)
    with (tmp_path / "notes" / "b.jsonl").open("a") as f:
        f.write('{"title": "no text here"}\n')
    (tmp_path / "run.toml").write_text(RUN.format(c="notes/missing.jsonl"))
    for bad, words in (("b", ["client-1", "b.jsonl:11", "expected"]), ("missing", ["client-2", "missing.jsonl"])):
        if bad == "missing":  # b fixed: the next client's missing file is the error
            (tmp_path / "notes" / "b.jsonl").write_text('{"text": "fine"}\n')
        started = time.monotonic()
        # in this process: a Ray cluster or a server started would show as time, a folder or a child
        assert main(["simulate", str(tmp_path / "run.toml"), "--run-dir", str(tmp_path / "run")]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and all(w in error[0] for w in words), error
        assert not (tmp_path / "run").exists()
        assert time.monotonic() - started < 10  # refused by the parent, before any process
