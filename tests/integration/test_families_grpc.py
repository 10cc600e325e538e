"""Non-LLaMA families over gRPC: the server's trunk (its own LoRA, KV cache, rewinds) per family."""

from __future__ import annotations

import pytest
import torch

import fedsea
from fedsea.model.tiny_families import tiny_family_model
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.trunk import TrunkHost
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
