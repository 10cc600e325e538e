"""``fedsea bench serve`` as a user runs it (tiny model, small sizes): one JSON line (issue 17, item 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


# The default (clients as threads); --client-processes differs only in where the bench's clients run.
@pytest.mark.parametrize("processes", [False], ids=["threads"])
def test_bench_serve_prints_one_json_line_with_joint_passes_and_identical_tokens(processes):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", "fedsea.cli", "bench", "serve", "--model", "tiny-llama", "--head-layers", "1"]
    cmd += ["--tail-layers", "1", "--clients", "2", "--sessions-each", "3", "--prompt-tokens", "4", "20"]
    cmd += ["--new-tokens", "6", "--json", "--replay", *(["--client-processes"] if processes else [])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout
    result = json.loads(lines[0])
    assert result["client_processes"] is processes
    assert result["sessions"] == 6 and result["identical_to_alone"] is True and result["errors"] == []
    assert result["multitenant_speedup"] > 0 and 0 < result["p50_token_ms"] <= result["p99_token_ms"]
    # The server joined the sessions' steps (its log line) and its memory was read.
    assert "joint" in result["server_passes"] and not result["server_passes"].startswith("0 ")
    assert result["server_peak_rss_mb"] >= result["server_rss_loaded_mb"] > 0
    assert result["cache_reserved_peak_mb"] > 0
    # Every session's head and tail calls all at once (one per new token), through each client's shared passes.
    passes = result["client_passes"]
    assert result["client_joint"] is True and passes["head_calls"] == passes["tail_calls"] == 6 * 6
    assert 0 < passes["head_passes"] <= passes["head_calls"] and 0 < passes["tail_passes"] <= passes["tail_calls"]
    # The replay sent the recorded trunk steps again: the same answers alone, within rounding all at once.
    assert result["replay_steps"] == 6 * 6 and result["replay_errors"] == []
    assert result["replay_identical_alone"] is True and result["replay_max_rel_diff_together"] < 1e-4
    assert result["replay_speedup"] > 0 and 0 < result["replay_p50_step_ms"] <= result["replay_p99_step_ms"]
