"""The real default model: SmolLM2-135M-Instruct from the packaged GGUF (30 blocks, width 576)."""

from __future__ import annotations

import logging

import pytest
import torch

import fedsea
from fedsea.model.load import converted_gguf_dir, packaged_gguf_path
from fedsea.training import make_batch
from tests.conftest import assert_close_to_scale, randomize_lora

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Summarize: the council approved a new park near the river after a long debate.",
    "Hi",
]


def _batch(tokenizer):
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"].sum(dim=1)


def test_gguf_converts_once_into_the_cache(tmp_path, monkeypatch, caplog, smollm2):
    monkeypatch.setenv("FEDSEA_CACHE", str(tmp_path))
    gguf = packaged_gguf_path("smollm2-135m")
    with caplog.at_level(logging.WARNING, logger="fedsea.model.load"):
        first = fedsea.load_model(gguf)
    folder = converted_gguf_dir(gguf)
    assert folder.is_relative_to(tmp_path) and (folder / "model.safetensors").is_file()
    assert sum("converting" in r.message for r in caplog.records) == 1
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedsea.model.load"):
        second = fedsea.load_model("smollm2-135m")  # the packaged name finds the same copy
    assert not any("converting" in r.message for r in caplog.records)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "gguf").iterdir() if p.name.startswith(".")]  # no temp leftovers
    for a, b, c in zip(
        first.state_dict().items(), second.state_dict().items(), smollm2.state_dict().items(), strict=True
    ):
        assert a[0] == b[0] == c[0] and torch.equal(a[1], b[1]) and torch.equal(a[1], c[1])
    cfg = second.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings) == (30, 576, True)
    assert getattr(cfg, "quantization_config", None) is None


def test_tokenizer_has_the_chat_template(smollm2_tokenizer):
    text = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHello<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert smollm2_tokenizer.padding_side == "left"


@pytest.mark.parametrize(("p", "q"), [(1, 1), (2, 2), (4, 1), (28, 1)])
def test_split_logits_equal_unsplit(smollm2, smollm2_tokenizer, p, q):
    input_ids, lengths = _batch(smollm2_tokenizer)
    assert len(set(lengths.tolist())) == 3
    split = fedsea.split_model(smollm2, p, q)
    with torch.no_grad():
        logits = split(input_ids, lengths)
        reference = fedsea.central_forward(smollm2, input_ids, lengths)
    assert_close_to_scale(logits, reference)
    for b, length in enumerate(lengths.tolist()):
        with torch.no_grad():
            alone = smollm2(input_ids[b : b + 1, -length:]).logits[0]
        assert_close_to_scale(logits[b, -length:], alone)


@pytest.mark.parametrize(("p", "q"), [(1, 1), (2, 2)])
def test_lora_gradients_equal_centralized(smollm2_tokenizer, p, q):
    lora = fedsea.LoraSpec(r=4, alpha=8, dropout=0.0)
    sides = []
    for _ in range(2):
        split = fedsea.split_model(fedsea.load_model("smollm2-135m"), p, q).add_lora(lora)
        randomize_lora(split.model, seed=0, scale=0.02)
        sides.append(split)
    seqs = [smollm2_tokenizer(t)["input_ids"] for t in PROMPTS]
    batch = make_batch(seqs, smollm2_tokenizer.pad_token_id, loss_from=[1, 4, 1])
    loss_split = fedsea.SplitTrainer(sides[0]).compute_gradients(batch)
    loss_central = fedsea.CentralTrainer(sides[1]).compute_gradients(batch)
    assert loss_split == pytest.approx(loss_central, rel=1e-5)
    grads = [{n: p.grad for n, p in s.model.named_parameters() if "lora_" in n} for s in sides]
    assert len(grads[1]) == 30 * 4 * 2
    for name, grad in grads[1].items():
        assert grad is not None and float(grad.abs().max()) > 0, name
        assert_close_to_scale(grads[0][name], grad)


def test_split_greedy_chat_answer_equals_hf_generate(smollm2, smollm2_tokenizer):
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    text = smollm2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = smollm2_tokenizer([text], return_tensors="pt", add_special_tokens=False)
    split = fedsea.split_model(smollm2, 2, 2)
    eos = smollm2_tokenizer.eos_token_id
    ours = fedsea.split_greedy_generate(split, enc["input_ids"], enc["attention_mask"].sum(1), 40, eos_token_id=eos)
    with torch.no_grad():
        theirs = smollm2.generate(**enc, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    theirs = theirs[:, enc["input_ids"].shape[1] :]
    assert ours.shape[1] >= 5
    assert ours[0].tolist() == theirs[0, : ours.shape[1]].tolist()


def test_split_greedy_batch_of_mixed_lengths_equals_hf_generate(smollm2, smollm2_tokenizer):
    input_ids, lengths = _batch(smollm2_tokenizer)
    split = fedsea.split_model(smollm2, 3, 2)
    ours = fedsea.split_greedy_generate(split, input_ids, lengths, 12)
    mask = (torch.arange(input_ids.shape[1]) >= (input_ids.shape[1] - lengths).unsqueeze(1)).long()
    with torch.no_grad():
        theirs = smollm2.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=smollm2_tokenizer.pad_token_id,
        )[:, input_ids.shape[1] :]
    assert torch.equal(ours, theirs)


def test_demo_answers_identically(capsys):
    from fedsea.experiments.demo import run_split_demo as run_demo

    result = run_demo(max_new_tokens=24, echo=False)
    assert result.identical and len(result.split_answer) > 0
    assert result.traffic.head_to_trunk > 0 and result.traffic.trunk_to_tail > 0
