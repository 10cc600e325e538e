"""``fedsea simulate`` on Flower: a client that cannot start is a warning naming it, the run goes on
without it; the run killed mid-round (SIGKILL: the ServerApp and the trunk server live in its
process), then ``--resume``: it goes on on Flower and its logs hold each step once."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.integration.simfaults import ENV, FEDSEA, RUN, start, steps


def _descendants(pid: int) -> set[int]:
    """The processes under ``pid`` (Ray's node: raylet, GCS, its agents and workers)."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if proc.name.isdigit():
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def test_a_killed_flower_run_resumes_on_flower_without_duplicate_steps(tmp_path):
    sim, run_dir = start(tmp_path, 2, "federation.round_timeout_s=120", engine="auto")
    deadline = time.monotonic() + 240
    # Round 1 checkpointed and round 2 under way: its steps are in the logs when the process dies.
    while not (
        (run_dir / "checkpoints" / "LATEST").exists() and any(s["round"] == 2 for s in steps(run_dir, "client-0"))
    ):
        assert sim.poll() is None and time.monotonic() < deadline, sim.communicate()[1][-3000:]
        time.sleep(0.05)
    ray = _descendants(sim.pid)
    sim.kill()
    sim.communicate(timeout=60)
    # SIGKILL leaves Ray's dashboard and runtime-env agents orphaned (raylet and workers go): end
    # what this test started, and the Ray temp folder.
    for pid in ray:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for folder in Path(tempfile.gettempdir()).glob(f"fedsea-ray-*/session_*_{sim.pid}"):
        shutil.rmtree(folder.parent, ignore_errors=True)
    assert (run_dir / "engine").read_text().strip() == "flower"

    done = subprocess.run([*FEDSEA, "simulate", "--resume", str(run_dir), "--json"], env=ENV,
                          capture_output=True, text=True, timeout=400)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["rounds_completed"] == 3 and summary["engine"] == "flower"  # the run's engine, not asked again
    rounds = [json.loads(x) for x in (run_dir / "server_rounds.jsonl").read_text().splitlines()]
    assert {r["engine"] for r in rounds} == {"flower"}
    for client in ("client-0", "client-1"):
        keys = [(s["round"], s["step"]) for s in steps(run_dir, client)]
        # The bug: a resumed Flower run kept the killed round's steps and logged them again.
        assert sorted(keys) == [(r, s) for r in (1, 2, 3) for s in range(3)], (client, keys)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    traffic = {(r["client"], r["round"]) for r in records if r["type"] == "traffic"}
    assert traffic >= {(c, r) for c in ("client-0", "client-1") for r in (1, 2, 3)}


def test_a_client_that_cannot_start_is_a_warning_naming_it_and_the_run_goes_on(tmp_path):
    # client-1's device does not exist: its ClientApp fails to build its split (every round).
    run_file = tmp_path / "run.toml"
    run_file.write_text(RUN.format(clients=2) + '[[clients]]\n[[clients]]\ndevice = "cuda:7"\n')
    argv = [*FEDSEA, "simulate", str(run_file), "federation.round_timeout_s=120", "--run-dir", str(tmp_path / "r")]
    done = subprocess.run([*argv, "--json"], env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0 and "Traceback" not in done.stderr.split("fedsea: warning")[-1], done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["rounds_completed"] == 3 and len(summary["lost_clients"]) == 1, summary["lost_clients"]
    (how,) = summary["lost_clients"].values()
    # The bug: Flower named the node only (a random id); the ClientApp's error now names its client.
    assert "client-1: " in how, how
    warnings = [x for x in done.stderr.splitlines() if x.startswith("fedsea: warning:")]
    assert len(warnings) == 1 and "client-1: " in warnings[0] and "the run finished without it" in warnings[0]
    rounds = [json.loads(x) for x in (tmp_path / "r" / "server_rounds.jsonl").read_text().splitlines()]
    assert all(r["submitted"] == ["client-0"] for r in rounds)
