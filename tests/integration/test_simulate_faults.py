"""``fedsea simulate`` when a client dies, or the server cannot start (real processes, SIGKILL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedsea
from tests.integration.simfaults import kill_when, start, steps


def test_a_lost_client_is_a_warning_and_the_run_still_reports(tmp_path):
    sim, run_dir = start(tmp_path, 3)
    argv: dict[str, bytes] = {}

    def ready() -> bool:
        if len(steps(run_dir, "client-2")) < 1:
            return False
        pids = json.loads((run_dir / "pids.json").read_text())
        argv.update({name: Path(f"/proc/{pids[name]}/cmdline").read_bytes() for name in ("client-0", "client-2")})
        return True

    kill_when(run_dir, "client-2", ready)
    # The clients' tokens reach them by the environment, never by argv (every user sees the process list).
    tokens = json.loads((run_dir / "secrets" / "client_tokens.json").read_text())
    assert argv and all(tokens[name].encode() not in argv[name] and b"join" in argv[name] for name in argv)
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


@pytest.mark.parametrize("engine", ["native", "flower"])
def test_a_server_that_cannot_start_leaves_no_half_made_folder(tmp_path, engine):
    # A model folder whose config reads but whose weights are garbage: the server fails to load it.
    model = tmp_path / "model"
    fedsea.tiny_llama().save_pretrained(model)
    fedsea.tiny_tokenizer().save_pretrained(model)
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    # On Flower the ServerApp starts the trunk server (the bug there: a traceback, the folder kept).
    sim, run_dir = start(tmp_path, 2, f'model.source="{model}"', engine=engine)
    _, err = sim.communicate(timeout=300)
    assert sim.returncode == 2 and "Traceback" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("fedsea: error:")]
    assert len(lines) == 1 and "the server did not start" in lines[0] and "cannot load the model" in lines[0]
    assert "removed the half-made run folder" in lines[0]
    assert not run_dir.exists()  # the bug: config, secrets and shards stayed behind
