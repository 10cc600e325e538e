"""``fedsea simulate`` when the server dies mid-round (SIGKILL), then ``--resume`` (real processes)."""

from __future__ import annotations

import json
import subprocess

from tests.integration.simfaults import ENV, FEDSEA, kill_when, start, steps


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
