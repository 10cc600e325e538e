"""``--speculative`` on ``fedsea generate`` and ``fedsea bench generate``, as a user runs them (tiny model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import fedsea
from fedsea.cli.main import main
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.trunk import TrunkHost


def test_generate_with_speculative_flags_prints_the_plain_answer(capsys):
    thread = ServerThread(TrunkServer(TrunkHost(fedsea.load_model("tiny-llama"))))
    port = thread.start()
    base = ["generate", "--server", f"localhost:{port}", "--model", "tiny-llama", "--head-layers", "1"]
    base += ["--tail-layers", "1", "--sigma", "0", "--max-new-tokens", "12", "--no-chat-template"]
    try:
        answers = []
        for extra in ([], ["--speculative", "prompt-lookup", "--draft-tokens", "3"], ["--speculative", "tiny-llama"]):
            assert main([*base, "--prompt", "the cat sat on the mat, the cat", *extra]) == 0
            answers.append(capsys.readouterr().out)
        assert answers[0] == answers[1] == answers[2] and answers[0].strip()
        # A batch is refused in one line (exit 2), not half-generated.
        argv = [*base, "--prompt", "a", "--prompt", "b", "--speculative", "prompt-lookup"]
        assert main(argv) == 2
        assert "batch 1" in capsys.readouterr().err
    finally:
        thread.stop()


def test_bench_generate_speculative_prints_one_json_line():
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", "fedsea.cli", "bench", "generate", "--model", "tiny-llama", "--speculative"]
    cmd += ["--prompts-per-task", "1", "--new-tokens", "6", "--prompt-tokens", "32", "--head-layers", "1"]
    cmd += ["--tail-layers", "1", "--net-latency-ms", "2", "--json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout
    result = json.loads(lines[0])
    assert result["identical"] is True
    for key in ("spec_tokens_per_round_trip", "spec_vs_plain_2ms", "spec_vs_plain_loopback"):
        assert result[key] > 0, key
    for task in ("xsum", "quac"):
        row = result[task]
        assert row["spec_round_trips"] <= row["plain_round_trips"]
        assert row["spec_tokens_per_round_trip"] == round(row["tokens"] / row["spec_round_trips"], 2)
