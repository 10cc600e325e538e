"""Non-LLaMA families over gRPC: the server's trunk (its own LoRA, KV cache, rewinds, training) per family."""

from __future__ import annotations

import pytest
import torch

import fedsea
from fedsea.model.adapters import adapter_state_dict
from fedsea.model.tiny_families import tiny_family_model
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.trunk import TrunkHost
from fedsea.training import make_batch
from tests.conftest import randomize_lora
from tests.unit.test_generation_loop import check_rewind

PROMPTS = ["The movie was a delight from start", "Hi", "Question: is the sky blue on a clear day?"]


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_generation_and_rewind_over_grpc_equal_hf_generate(family, tiny_tokenizer):
    enc = tiny_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    lengths = enc["attention_mask"].sum(dim=1)
    thread = ServerThread(TrunkServer(TrunkHost(tiny_family_model(family), None)))
    port = thread.start()
    try:
        split = fedsea.split_model(tiny_family_model(family), 1, 1).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
        randomize_lora(split.model, seed=1, scale=0.2)
        with fedsea.SplitClient(f"localhost:{port}", split, tokenizer=tiny_tokenizer) as client:
            ours = client.generate_ids(enc["input_ids"], lengths, max_new_tokens=12, eos_token_id=())
            check_rewind(split, lambda: client.stepper(max_length=64), enc["input_ids"], lengths)
    finally:
        thread.stop()
    with torch.no_grad():
        theirs = split.model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=None)
    assert ours.token_ids == theirs[:, enc["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_training_steps_over_grpc_equal_in_process_steps(family, tiny_tokenizer):
    optim = fedsea.OptimConfig(lr=1e-2)

    def lora_split() -> fedsea.SplitModel:
        split = fedsea.split_model(tiny_family_model(family), 1, 1).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
        randomize_lora(split.model, seed=1)
        return split

    local, remote = lora_split(), lora_split()
    in_process = fedsea.SplitTrainer(local, optim=optim)
    batch = make_batch([tiny_tokenizer(t)["input_ids"] for t in PROMPTS], tiny_tokenizer.pad_token_id)
    thread = ServerThread(TrunkServer(TrunkHost(tiny_family_model(family), None)))
    port = thread.start()
    try:
        with fedsea.SplitClient(f"localhost:{port}", remote, optim=optim) as client:
            for _ in range(2):
                assert client.train_step(batch).loss == in_process.train_step(batch).loss
            served = client.trunk_adapter()
    finally:
        thread.stop()
    expected = adapter_state_dict(local.trunk)
    assert served.keys() == expected.keys() and all(torch.equal(served[k], expected[k]) for k in expected)
