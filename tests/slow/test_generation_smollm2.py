"""SmolLM2 split generation over a real gRPC server equals Hugging Face generate."""

from __future__ import annotations

import pytest
import torch

import fedsea
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.trunk import TrunkHost
from tests.conftest import randomize_lora

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_server():
    with ServerThread(TrunkServer(TrunkHost(fedsea.load_model("smollm2-135m")))) as port:
        yield f"127.0.0.1:{port}"


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_equals_hf_generate_with_adapters(smol_server, smollm2_tokenizer, batch):
    prompts = ["What is the capital of France?", "Name a colour.", "Write one word about the sea."][:batch]
    split = fedsea.split_model(fedsea.load_model("smollm2-135m"), 2, 2).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=0, scale=0.01)
    texts = [
        smollm2_tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    enc = smollm2_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    lengths = enc["attention_mask"].sum(dim=1)
    eos = smollm2_tokenizer.eos_token_id
    with fedsea.SplitClient(smol_server, split, tokenizer=smollm2_tokenizer) as client:
        ours = client.generate_ids(enc["input_ids"], lengths, max_new_tokens=24)
    with torch.no_grad():
        theirs = split.model.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    theirs = theirs[:, enc["input_ids"].shape[1] :].tolist()
    theirs = [row[: row.index(eos) + 1] if eos in row else row for row in theirs]
    assert ours.token_ids == theirs
    assert all(len(t) >= 3 for t in ours.token_ids)
