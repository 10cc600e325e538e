"""``fedsea bridge train`` end to end: a bridge file that ``--speculative bridge:FILE`` loads, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import fedsea
from fedsea.cli import bridge as cli
from fedsea.training import bridge_train
from fedsea.training.bridge import read_bridge_meta

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _fedsea(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedsea.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)  # fmt: skip


def test_bridge_train_writes_a_bridge_the_drafter_loads(tmp_path, tiny_tokenizer):
    out = tmp_path / "bridge.safetensors"
    run = _fedsea("bridge", "train", "--model", "tiny-llama", "--head-layers", "1", "--tail-layers", "1",
                  "--tasks", "xsum", "--examples", "24", "--seq-len", "48", "--steps", "4", "--out", str(out),
                  "--no-progress")  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["bridge"] == str(out) and result["steps"] == 4 and 0.0 <= result["agreement_after"] <= 1.0
    meta = read_bridge_meta(out)
    assert (meta["head_layers"], meta["tail_layers"], meta["info"]["tasks"]) == (1, 1, ["xsum"])
    assert f"--speculative bridge:{out}" in run.stderr
    # The file drives speculative generation on that model and cut, token-identical to plain.
    split = fedsea.split_model(fedsea.load_model("tiny-llama"), 1, 1)
    tokenizer = fedsea.load_tokenizer("tiny-llama")
    enc = tokenizer(["a short prompt about the weather"], return_tensors="pt")
    lengths = enc["attention_mask"].sum(1)
    plain = fedsea.training.generate(split, fedsea.training.LocalStepper(split.trunk), enc["input_ids"], lengths,
                                     fedsea.training.GenerationConfig(max_new_tokens=8, eos_token_id=()))  # fmt: skip
    spec = fedsea.training.generate(
        split, fedsea.training.LocalStepper(split.trunk), enc["input_ids"], lengths,
        fedsea.training.GenerationConfig(max_new_tokens=8, eos_token_id=(), speculative=f"bridge:{out}"),
    )  # fmt: skip
    assert spec.token_ids == plain.token_ids


def test_bridge_train_errors_are_one_line(tmp_path):
    run = _fedsea("bridge", "train", "--model", "tiny-llama", "--out", str(tmp_path / "b.bin"))
    assert run.returncode == 2 and "a bridge file ends in .safetensors" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    out = str(tmp_path / "b.safetensors")
    run = _fedsea("bridge", "train", "--model", "tiny-llama", "--head-layers", "9", "--out", out)
    assert run.returncode == 2 and "head_layers" in run.stderr.lower().replace("-", "_"), run.stderr


def test_cli_defaults_are_the_library_defaults():
    lib = bridge_train
    assert (cli.STEPS, cli.BATCH, cli.SEQ_LEN, cli.LR, cli.CE_FRACTION, cli.LAYERS, cli.DRAFT_VOCAB) == (
        lib.BRIDGE_STEPS, lib.BRIDGE_BATCH, lib.BRIDGE_SEQ_LEN, lib.BRIDGE_LR, lib.BRIDGE_CE_FRACTION,
        fedsea.training.bridge.BRIDGE_LAYERS, lib.BRIDGE_DRAFT_VOCAB)  # fmt: skip
