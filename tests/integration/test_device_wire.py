"""bfloat16 end to end through a real loopback server: training, generation, mixed dtypes, CLI device errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import fedsea
from fedsea.cli.main import main
from fedsea.client.generation import GenerationConfig, LocalStepper, generate
from fedsea.model.device import cast_and_place
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.trunk import TrunkHost
from tests.conftest import randomize_lora
from tests.integration.conftest import TINY, tiny_batch

CPU = torch.device("cpu")
OPTIM = fedsea.OptimConfig(lr=1e-2)


def _model(dtype: torch.dtype) -> fedsea.PreTrainedModel:
    return cast_and_place(fedsea.tiny_llama(**TINY), dtype, CPU)  # type: ignore[return-value]


def _split(dtype: torch.dtype) -> fedsea.SplitModel:
    split = fedsea.split_model(_model(dtype), 2, 1).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=1, scale=0.2)
    return split


@contextmanager
def _server(dtype: torch.dtype) -> Iterator[str]:
    thread = ServerThread(TrunkServer(TrunkHost(_model(dtype))))
    port = thread.start()
    try:
        yield f"localhost:{port}"
    finally:
        thread.stop()


def test_bf16_training_and_generation_over_grpc_equal_the_bf16_split_in_process(tiny_tokenizer):
    remote, local = _split(torch.bfloat16), _split(torch.bfloat16)
    in_process = fedsea.SplitTrainer(local, optim=OPTIM)
    batch = tiny_batch(tiny_tokenizer)
    enc = tiny_tokenizer(["The movie was a delight", "Hi"], return_tensors="pt", padding=True)
    lengths = enc["attention_mask"].sum(dim=1)
    with _server(torch.bfloat16) as address, fedsea.SplitClient(address, remote, optim=OPTIM) as client:
        assert client.wire_dtype == "bf16"  # the default follows the model's dtype
        losses = [client.train_step(batch).loss for _ in range(4)]
        # bf16 on the wire is lossless for bf16 tensors: the same numbers as in process.
        assert losses == [in_process.train_step(batch).loss for _ in range(4)]
        assert losses[-1] < losses[0]
        ours = client.generate_ids(enc["input_ids"], lengths, max_new_tokens=8, eos_token_id=())
        stats = client.stats()
    config = GenerationConfig(max_new_tokens=8, eos_token_id=())
    # The in-process split trained the same steps: its trunk adapter is the server's.
    theirs = generate(local, LocalStepper(local.trunk), enc["input_ids"], lengths, config)
    assert ours.token_ids == theirs.token_ids
    assert stats["wire_itemsize"] == 2


def test_a_float32_client_trains_against_a_bfloat16_server(tiny_tokenizer):
    """Different dtypes on the two sides: one base model (fingerprint), the wire in the client's dtype."""
    with _server(torch.bfloat16) as address, fedsea.SplitClient(address, _split(torch.float32), optim=OPTIM) as client:
        assert client.wire_dtype == "fp32"
        first = client.train_step(tiny_batch(tiny_tokenizer)).loss
        last = [client.train_step(tiny_batch(tiny_tokenizer)).loss for _ in range(3)][-1]
    assert torch.isfinite(torch.tensor(first)) and last < first


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_missing_gpu_is_a_one_line_cli_error(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello there"}) + "\n")
    assert main(["serve", "--model", "tiny-llama", "--device", "cuda"]) == 2
    assert "fedsea: error: device 'cuda' needs CUDA" in _one_line_error(capsys)
    train = ["train", "--server", "localhost:1", "--data", str(data), "--model", "tiny-llama", "--device", "cuda:1"]
    assert main(train) == 2
    assert "device 'cuda:1'" in _one_line_error(capsys)
    assert main(["eval", "--task", "sst2", "--model", "tiny-llama", "--device", "cuda"]) == 2
    assert "use --device cpu" in _one_line_error(capsys)
    assert main(["serve", "--model", "tiny-llama", "--device", "gpu"]) == 2
    assert "device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'" in _one_line_error(capsys)


def test_train_and_generate_commands_in_bf16_against_a_bf16_server(tmp_path, capsys):
    """The commands' own path: --device/--dtype to load_model, wire auto = bf16, the serve loader."""
    from fedsea.cli.generate import load_placed
    from fedsea.federation.simconfig import ModelSettings

    rows = [{"prompt": "Review: a delight. Sentiment:", "completion": " positive"}, {"text": "A new park."}] * 3
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    host = TrunkHost(load_placed(ModelSettings("tiny-llama", "auto", "bf16"), spread=True))
    assert host.model.dtype == torch.bfloat16
    thread = ServerThread(TrunkServer(host))
    port = thread.start()
    try:
        conn = [
            "--server",
            f"localhost:{port}",
            "--model",
            "tiny-llama",
            "--device",
            "cpu",
            "--dtype",
            "bf16",
            "--head-layers",
            "1",
            "--tail-layers",
            "1",
        ]
        train = ["train", *conn, "--data", str(data), "--epochs", "3", "--batch-size", "3", "--lr", "1e-2"]
        assert main([*train, "--sigma", "0", "--json", "--quiet", "--save-adapters", str(tmp_path / "ad")]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["steps"] == 6 and summary["loss_last"] < summary["loss_first"]
        said = ["generate", *conn, "--adapters", str(tmp_path / "ad"), "--prompt", "The movie was", "--sigma", "0"]
        assert main([*said, "--max-new-tokens", "3", "--no-chat-template"]) == 0
        assert capsys.readouterr().out.strip()
    finally:
        thread.stop()
