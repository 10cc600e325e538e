"""A federated run's result used through the split (issue 16 item 2): a round checkpoint or a run
folder is taken wherever adapter folders are. Through a real trunk server on loopback, the client
takes head and tail from the global adapter and puts the trunk blocks on its session; greedy
generation then gives the same tokens as ``fedsea export``'s merged model generating unsplit, and
``fedsea generate`` splits at the run's (p, q) when none is given."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from fedsea.cli.main import main
from fedsea.client.prompts import encode_prompts
from fedsea.client.split_client import SplitClient
from fedsea.config import NoiseConfig
from fedsea.federation.run_adapters import load_run_adapters, run_cut
from fedsea.model.load import load_model, load_tokenizer
from fedsea.model.split import split_model
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.trunk import TrunkHost

FEDSEA = [sys.executable, "-m", "fedsea.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
PROMPT = "Patient 3 was admitted with"
NEW_TOKENS = 8

# (p, q) = (1, 2): fedsea generate's own default (2, 2) does not even fit the 4-block tiny model.
RUN = """
[model]
source = "tiny-llama"
[task]
data = "notes.jsonl"
holdout = 0.0
[federation]
clients = 2
rounds = 2
local_steps = 3
round_timeout_s = 300
[optim]
lr = 0.02
[client]
head_layers = 1
tail_layers = 2
batch_size = 4
max_length = 32
[noise]
sigma = 0.0
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-round tiny run (Flower's Simulation Engine, ~40 s) and its exported merged model."""
    folder = tmp_path_factory.mktemp("run")
    rows = [{"text": f"Patient {i} was admitted with a fever and discharged after two days."} for i in range(12)]
    (folder / "notes.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "run.toml").write_text(RUN)
    done = subprocess.run(
        [*FEDSEA, "simulate", str(folder / "run.toml"), "--run-dir", str(folder / "run"), "--json"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    assert main(["export", str(folder / "run"), str(folder / "merged")]) == 0
    return folder / "run", folder / "merged"


def _greedy_unsplit(model, ids: torch.Tensor, eos: int | None) -> list[int]:
    """Greedy decoding of the whole (merged) model, recomputing every step: the reference."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(token)
            if token == eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


@pytest.fixture
def trunk_server():
    """The base tiny model's trunk server on a loopback port (plaintext, no tokens), in this process."""
    thread = ServerThread(TrunkServer(TrunkHost(load_model("tiny-llama", "float32", "cpu"))))
    port = thread.start()
    try:
        yield f"localhost:{port}"
    finally:
        thread.stop()


def test_split_generation_with_a_checkpoint_matches_the_exported_model(finished_run, trunk_server, capsys, monkeypatch):
    run_dir, merged_dir = finished_run
    checkpoint = run_dir / "checkpoints" / "round-0002"
    assert run_cut(checkpoint) == run_cut(run_dir) == (1, 2)
    tokenizer = load_tokenizer("tiny-llama")
    merged = load_model(str(merged_dir), "float32", "cpu")
    split = split_model(load_model("tiny-llama", "float32", "cpu"), 1, 2)
    assert load_run_adapters(split, checkpoint) == 2
    ids, lengths = encode_prompts(tokenizer, split, PROMPT, False)
    expected = _greedy_unsplit(merged, ids, tokenizer.eos_token_id)
    # the base model answers otherwise: the run's adapters are what the split uses
    assert expected != _greedy_unsplit(load_model("tiny-llama", "float32", "cpu"), ids, tokenizer.eos_token_id)

    with SplitClient(trunk_server, split, noise=NoiseConfig(sigma=0.0), wire_dtype="fp32", tokenizer=tokenizer) as c:
        got = c.generate_ids(ids, lengths, max_new_tokens=NEW_TOKENS).token_ids[0]
    assert got == expected

    # the CLI, given the run folder (its latest round, round 2) and no (p, q): the run's (1, 2)
    argv = ["generate", "--server", trunk_server, "--model", "tiny-llama", "--adapters", str(run_dir),
            "--sigma", "0", "--wire-dtype", "fp32", "--no-chat-template", "--max-new-tokens", str(NEW_TOKENS),
            "--prompt", PROMPT]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.strip() == tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert "round 2" in err and "(1, 2)" in err

    # fedsea chat with the round checkpoint: the conversation in the chat template, same tokens again
    conversation = [{"role": "user", "content": PROMPT}]
    chat_ids, _ = encode_prompts(tokenizer, split, conversation, None)
    chat_tokens = _greedy_unsplit(merged, chat_ids, tokenizer.eos_token_id)
    chat_expected = tokenizer.decode(chat_tokens, skip_special_tokens=True)
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n/quit\n"))
    argv = ["chat", "--server", trunk_server, "--model", "tiny-llama", "--adapters", str(checkpoint), "--sigma", "0",
            "--wire-dtype", "fp32", "--max-new-tokens", str(NEW_TOKENS)]  # fmt: skip
    assert main(argv) == 0
    answer = next(line for line in capsys.readouterr().out.splitlines() if "model> " in line)
    assert answer.split("model> ", 1)[1].strip() == chat_expected.strip()


def test_the_openai_endpoint_with_a_run_folder_matches_the_exported_model(finished_run, trunk_server, monkeypatch):
    """``fedsea openai --adapters RUN`` (issue 17 item 3): the run's latest round through the split,
    greedy, gives the exported merged model's tokens, as a completion and as a chat answer."""
    import openai

    from fedsea.cli.main import build_parser
    from fedsea.cli.openai_cmd import open_endpoint
    from fedsea.serving.app import EndpointThread

    monkeypatch.delenv("FEDSEA_OPENAI_API_KEY", raising=False)
    run_dir, merged_dir = finished_run
    tokenizer = load_tokenizer("tiny-llama")
    merged = load_model(str(merged_dir), "float32", "cpu")
    split = split_model(load_model("tiny-llama", "float32", "cpu"), 1, 2)
    conversation = [{"role": "user", "content": PROMPT}]
    expected = [
        tokenizer.decode(_greedy_unsplit(merged, ids, tokenizer.eos_token_id), skip_special_tokens=True)
        for ids in (encode_prompts(tokenizer, split, p, chat)[0] for p, chat in ((PROMPT, False), (conversation, None)))
    ]
    argv = ["openai", "--server", trunk_server, "--model", "tiny-llama", "--adapters", str(run_dir), "--sigma", "0",
            "--wire-dtype", "fp32", "--port", "0"]  # fmt: skip
    endpoint = open_endpoint(build_parser().parse_args(argv))
    served = EndpointThread(endpoint.app, sock=endpoint.sock)
    api = openai.OpenAI(base_url=served.start(), api_key="none", max_retries=0, timeout=60)
    try:
        text = api.completions.create(model="tiny-llama", prompt=PROMPT, temperature=0, max_tokens=NEW_TOKENS)
        chat = api.chat.completions.create(
            model="tiny-llama", messages=conversation, temperature=0, max_tokens=NEW_TOKENS
        )
        assert [text.choices[0].text, chat.choices[0].message.content] == expected
    finally:
        served.stop()


def test_eval_through_the_split_with_a_run_folder_matches_the_exported_model(finished_run, capsys):
    run_dir, merged_dir = finished_run
    common = ["--task", "sst2", "--limit", "6", "--no-progress", "--json"]
    capsys.readouterr()
    assert main(["eval", "--model", "tiny-llama", "--adapter", str(run_dir), *common]) == 0
    split = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "--model", str(merged_dir), *common]) == 0
    unsplit = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert split["partition"] == [1, 2] and unsplit["partition"] is None
    assert split["metrics"] == pytest.approx(unsplit["metrics"], abs=1e-5)


def test_a_run_folder_without_rounds_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    (tmp_path / "empty" / "config.toml").write_text(RUN)
    argv = ["eval", "--model", "tiny-llama", "--task", "sst2", "--limit", "2", "--no-progress"]
    assert main([*argv, "--adapter", str(tmp_path / "empty")]) == 2
    assert "no completed round" in capsys.readouterr().err


def test_merge_takes_a_run_folder_or_round_checkpoint_as_export_does(finished_run, tmp_path, capsys):
    from safetensors.torch import load_file

    run_dir, merged_dir = finished_run
    assert main(["merge", str(run_dir), str(tmp_path / "merged")]) == 0  # the run's model, its latest round
    assert main(["merge", str(run_dir / "checkpoints" / "round-0002"), str(tmp_path / "round2")]) == 0
    assert main(["merge", str(run_dir / "checkpoints" / "round-0001"), str(tmp_path / "round1")]) == 0
    exported = {k: v for f in merged_dir.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    for name, same in (("merged", True), ("round2", True), ("round1", False)):
        got = {k: v for f in (tmp_path / name).glob("*.safetensors") for k, v in load_file(str(f)).items()}
        assert got.keys() == exported.keys()
        assert all(torch.equal(got[k], exported[k]) for k in got) is same, name
        assert (tmp_path / name / "README.md").is_file()  # the run's model card, as export writes
    capsys.readouterr()
    assert main(["merge", str(run_dir), str(tmp_path / "x"), "--head-layers", "1"]) == 2
    assert "drop --head-layers" in capsys.readouterr().err
    assert main(["merge", str(run_dir), str(tmp_path / "x"), "--model", "smollm2-135m"]) == 2
    assert "was trained on tiny-llama" in capsys.readouterr().err
