"""Split speculative decoding over a real gRPC stream: several tokens per round trip, the same tokens."""

from __future__ import annotations

import pytest
import torch

import fedsea
from fedsea.training.drafters import ModelDrafter
from fedsea.training.generation_config import GenerationConfig
from tests.conftest import randomize_lora
from tests.integration.conftest import TINY

PROMPT = "The movie was a delight from start to finish, a delight"


def _split(seed: int = 3, scale: float = 0.05) -> fedsea.SplitModel:
    split = fedsea.split_model(fedsea.tiny_llama(**TINY), 2, 2).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=seed, scale=scale)
    return split


def _hf(model, enc, new, tokenizer):
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None
        )
    return out[0, enc["input_ids"].shape[1] :].tolist()


def test_speculative_over_grpc_equals_hf_in_fewer_round_trips(server, tiny_tokenizer):
    enc = tiny_tokenizer([PROMPT], return_tensors="pt")
    lengths = enc["attention_mask"].sum(1)
    for split in (_split(), _split(seed=1, scale=0.2)):  # repeating itself, and not
        theirs = _hf(split.model, enc, 24, tiny_tokenizer)
        drafters = {"prompt-lookup": "prompt-lookup", "model": ModelDrafter(_split(seed=7, scale=0.3).model, 512)}
        with fedsea.SplitClient(server, split, tokenizer=tiny_tokenizer) as client:
            assert client.connection is not None
            before = client.connection.meter.rpc("generate").calls
            plain = client.generate_ids(enc["input_ids"], lengths, max_new_tokens=24, eos_token_id=())
            plain_trips = client.connection.meter.rpc("generate").calls - before
            assert plain.token_ids[0] == theirs and plain_trips == 24
            for name, drafter in drafters.items():
                before = client.connection.meter.rpc("generate").calls
                spec = client.generate_ids(
                    enc["input_ids"], lengths, max_new_tokens=24, eos_token_id=(), speculative=drafter
                )
                trips = client.connection.meter.rpc("generate").calls - before
                assert spec.token_ids[0] == theirs, name
                assert trips <= plain_trips, name
            # The target as its own drafter: every draft kept, k + 1 tokens a round trip after the prefill.
            before = client.connection.meter.rpc("generate").calls
            spec = client.generate_ids(
                enc["input_ids"],
                lengths,
                max_new_tokens=24,
                eos_token_id=(),
                speculative=ModelDrafter(split.model, 512),
            )
            assert spec.token_ids[0] == theirs
            k = GenerationConfig(speculative=ModelDrafter(split.model, 512)).draft_tokens()  # 6: a model's default
            assert client.connection.meter.rpc("generate").calls - before == 1 + -(-23 // (k + 1))
            streamed = "".join(
                client.stream(PROMPT, chat=False, max_new_tokens=24, eos_token_id=(), speculative="prompt-lookup")
            )
            assert streamed == plain.texts[0]
    # The repeating model copies itself: prompt lookup needs well under one round trip a token.
    with fedsea.SplitClient(server, _split(), tokenizer=tiny_tokenizer) as client:
        assert client.connection is not None
        before = client.connection.meter.rpc("generate").calls
        client.generate_ids(enc["input_ids"], lengths, max_new_tokens=30, eos_token_id=(), speculative="prompt-lookup")
        assert 30 / (client.connection.meter.rpc("generate").calls - before) >= 2


def test_speculative_refuses_a_batch_over_grpc(server, tiny_tokenizer):
    with fedsea.SplitClient(server, _split(), tokenizer=tiny_tokenizer) as client:
        with pytest.raises(ValueError, match="batch 1"):
            client.generate(["Hi", "Hello there"], speculative="prompt-lookup")
        assert client.generate("Hi", max_new_tokens=3, speculative="prompt-lookup")  # the stream still works


@pytest.mark.slow
def test_speculative_on_smollm2_equals_hf_generate(smollm2, smollm2_tokenizer):
    from fedsea.training import GenerationConfig, LocalStepper, generate

    split = fedsea.split_model(smollm2, 2, 2)
    prompt = "Question: what is the capital of France? The capital of France is"
    enc = smollm2_tokenizer([prompt], return_tensors="pt")
    lengths = enc["attention_mask"].sum(1)
    with torch.no_grad():
        ref = smollm2.generate(
            **enc, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=smollm2_tokenizer.pad_token_id
        )
    theirs = ref[0, enc["input_ids"].shape[1] :].tolist()
    for speculative in ("prompt-lookup", ModelDrafter(smollm2, int(smollm2.config.vocab_size))):
        config = GenerationConfig(max_new_tokens=24, eos_token_id=(), speculative=speculative)
        out = generate(split, LocalStepper(split.trunk), enc["input_ids"], lengths, config)
        assert out.token_ids[0] == theirs


def test_a_verification_step_past_the_streams_max_length_is_refused(server, tiny_tokenizer):
    from fedsea.errors import RemoteError

    split = _split()
    enc = tiny_tokenizer([PROMPT], return_tensors="pt")
    n = enc["input_ids"].shape[1]
    with fedsea.SplitClient(server, split, tokenizer=tiny_tokenizer) as client:
        h = split.head(enc["input_ids"], torch.tensor([n])).detach()  # (1, n, d)
        stepper = client.stepper(max_length=n + 4)
        stepper.step(0, h, torch.tensor([n]), None)
        assert stepper.step(1, h[:, :4], None, None).shape == (1, 4, 64)  # k + 1 = 4 vectors: the slots left
        stepper.rewind(n + 1)
        with pytest.raises(RemoteError, match="max_length"):
            stepper.step(2, h[:, :4], None, None)  # 4 more from n + 1 would pass n + 4
        stepper.close()
