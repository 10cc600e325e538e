"""``fedsea bench generate`` as a user runs it (tiny model, small sizes): one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bench_generate_prints_one_json_line_with_identical_tokens():
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", "fedsea.cli", "bench", "generate", "--model", "tiny-llama", "--prompt-tokens", "24"]
    cmd += ["--head-layers", "1", "--tail-layers", "1"]
    cmd += ["--new-tokens", "6", "--batches", "1", "3", "--naive-tokens", "3", "--net-latency-ms", "2", "--json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout
    result = json.loads(lines[0])
    # The co-located benchmark restarted itself with a shorter OpenMP spin (see fedsea.cli).
    assert result["gomp_spincount"] == "100000"
    for batch in (1, 3):
        row = result[f"batch{batch}"]
        assert row["identical_to_central"] is True
        assert row["theoretical_bytes_per_step"] == 2 * batch * 64 * 4
        assert row["theoretical_bytes_per_step"] < row["bytes_per_step"] < 1.1 * row["theoretical_bytes_per_step"] + 200
        assert row["split_tok_s"] > 0 and row["central_tok_s"] > 0 and row["naive_tok_s"] > 0
    for key in ("split_tok_s", "central_tok_s", "naive_tok_s", "bytes_per_step", "theoretical_bytes_per_step"):
        assert key in result


def test_bench_train_on_a_random_shape_in_bfloat16_reports_device_dtype_and_model():
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env["HF_HUB_OFFLINE"] = "1"
    model = "random:llama-tiny?layers=3&seed=1"
    cmd = [sys.executable, "-m", "fedsea.cli", "bench", "train", "--model", model, "--device", "cpu"]
    cmd += ["--dtype", "bfloat16", "--batch", "2", "--tokens", "8", "--head-layers", "1", "--tail-layers", "1"]
    cmd += ["--steps", "1", "--warmup", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout
    result = json.loads(lines[0])
    assert (result["model"], result["device"], result["dtype"]) == (model, "cpu", "bfloat16")
    # Client and server built the same weights (else the server would have refused the session).
    # The wire dtype follows the model's: bfloat16, 2 bytes per element.
    assert result["wire_dtype"] == "bf16"
    assert result["bytes_per_step"] >= result["theoretical_bytes_per_step"] == 4 * 2 * 8 * 64 * 2
    assert result["split_step_s"] > 0 and result["central_step_s"] > 0


def test_bench_wire_prints_one_json_line_against_the_ceiling():
    cmd = [sys.executable, "-m", "fedsea.cli", "bench", "wire", "--sizes-mib", "1", "--dtypes", "bf16", "fp32"]
    cmd += ["--repeats", "1", "--chunk-kib", "256", "512", "--compression", "int8", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout
    result = json.loads(lines[0])
    assert result["direction"].startswith("one way") and result["chunk_bytes"] == 256 * 1024
    assert result["throughput_mb_s"] > 0 and result["ceiling_mb_s"] > 0 and result["head_row"] == "1mib_bf16"
    for name, d in (("bf16", 256), ("fp32", 128)):
        row = result["rows"][f"1mib_{name}"]
        assert row["shape"] == [4, 512, d] and row["bytes"] == 1 << 20
        for key in (
            "tensor_mb_s",
            "wrapped_mb_s",
            "legacy_mb_s",
            "raw_mb_s",
            "tensor_512k_mb_s",
            "raw_512k_mb_s",
            "tensor_int8_mb_s",
            "ratio_to_ceiling",
        ):
            assert row[key] > 0, key
