"""Every supported decoder family, split, against its own unsplit Hugging Face model.

Each family is a tiny random model (``fedsea.model.tiny_families``) whose config turns on what
is particular about it: sliding windows smaller than the prompts (so the sliding path runs),
Gemma's scaled embedding and soft-caps, Gemma 3's local/global rope, Qwen 3's q/k norms,
Phi-3's fused projections, LLaMA 3 rope scaling, tied and untied embeddings.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import fedsea
from fedsea.cli.main import main
from fedsea.errors import UnsupportedModelError
from fedsea.model.families import FAMILIES, SLIDING_ATTENTION, layer_types
from fedsea.model.masks import padding_mask
from fedsea.model.split import check_partition, no_padding, partition_range
from fedsea.model.tiny_families import TINY_FAMILIES, TINY_FAMILY_LAYERS, TINY_WINDOW, tiny_family_model
from fedsea.training import LocalStepper, SplitDecoder
from tests.conftest import assert_close_to_scale, randomize_lora
from tests.unit.test_generation_loop import NEW, check_rewind, greedy

NEW_TOKENS = 12  # past the window for every row: the shortest prompt has 2 tokens, the window is 6


def _lora_split(family: str, p: int = 1, q: int = 1) -> fedsea.SplitModel:
    split = fedsea.split_model(tiny_family_model(family), p, q).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=5, scale=0.1)
    return split


def _hf_logits(model: torch.nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The model's own forward on the left-padded batch, as a user calls it."""
    out: torch.Tensor = model(input_ids, attention_mask=padding_mask(lengths, input_ids.shape[1])).logits
    return out


def test_the_tiny_families_exercise_what_is_particular_about_them(tiny_batch):
    input_ids, lengths = tiny_batch
    assert input_ids.shape[1] > TINY_WINDOW and int(lengths.min()) + NEW_TOKENS > TINY_WINDOW
    assert set(TINY_FAMILIES) == {f.name for f in FAMILIES.values()}
    ties = {name: tiny_family_model(name).config.tie_word_embeddings for name in TINY_FAMILIES}
    assert any(ties.values()) and not all(ties.values())
    for name in ("qwen2", "mistral", "gemma2", "gemma3", "phi3"):
        assert SLIDING_ATTENTION in layer_types(tiny_family_model(name).config), name
    gemma2 = tiny_family_model("gemma2").config
    assert gemma2.attn_logit_softcapping and gemma2.final_logit_softcapping


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_split_logits_equal_the_unsplit_model(family, tiny_batch):
    input_ids, lengths = tiny_batch
    model = tiny_family_model(family)
    real = padding_mask(lengths, input_ids.shape[1]).bool()  # (B, n): padding slots are not compared
    with torch.no_grad():
        reference = _hf_logits(model, input_ids, lengths)
        for p, q in [(1, 1), (2, 1), (1, 2)]:
            logits = fedsea.split_model(model, p, q)(input_ids, lengths)
            assert_close_to_scale(logits[real], reference[real])
        # An unpadded batch (no mask at all on either side) and one sequence alone.
        full = input_ids[:1]
        split = fedsea.split_model(model, 1, 2)
        assert_close_to_scale(split(full, torch.tensor([full.shape[1]])), model(full).logits)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_lora_gradients_equal_the_unsplit_model(family, tiny_batch):
    input_ids, lengths = tiny_batch
    split = _lora_split(family, 1, 2)
    mask = padding_mask(lengths, input_ids.shape[1]).bool()
    real = mask[:, :-1] & mask[:, 1:]  # (B, n-1): a real token predicting a real one (not from padding)

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1][real], input_ids[:, 1:][real])

    loss_of(split(input_ids, lengths)).backward()
    params = {n: p for n, p in split.model.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params)
    ours = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    assert len(ours) == len(params)
    # The unsplit model as a user calls it, and with generate's positions (``central_forward``).
    for reference in (_hf_logits, fedsea.central_forward):
        split.model.zero_grad()
        loss_of(reference(split.model, input_ids, lengths)).backward()
        for name, param in params.items():
            assert param.grad is not None
            assert_close_to_scale(ours[name], param.grad, rel=1e-4)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_split_generation_equals_hf_generate(family, tiny_batch):
    input_ids, lengths = tiny_batch
    split = _lora_split(family)
    ours = fedsea.split_greedy_generate(split, input_ids, lengths, NEW_TOKENS)
    with torch.no_grad():
        theirs = split.model.generate(
            input_ids=input_ids,
            attention_mask=padding_mask(lengths, input_ids.shape[1]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
        )[:, input_ids.shape[1] :]
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_rewind_then_continue_equals_an_uninterrupted_run(family, tiny_batch):
    input_ids, lengths = tiny_batch
    split = _lora_split(family, 1, 1)
    check_rewind(split, lambda: LocalStepper(split.trunk), input_ids, lengths)
    # Two rewinds in a row, the second further back than the first (past the window both times).
    reference = greedy(SplitDecoder(split, LocalStepper(split.trunk), input_ids, lengths), NEW)
    decoder = SplitDecoder(split, LocalStepper(split.trunk), input_ids, lengths)
    first = greedy(decoder, NEW)
    prompt = input_ids.shape[1]
    decoder.rewind(prompt + 7)
    decoder.feed(first[:, 7:8])
    greedy(decoder, 1)
    decoder.rewind(prompt + 3)
    decoder.feed(first[:, 3:4])
    assert torch.equal(torch.cat([first[:, :4], greedy(decoder, NEW - 4)], dim=1), reference)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_export_writes_a_checkpoint_hf_loads_with_equal_logits(family, tiny_batch, tmp_path, capsys):
    input_ids, lengths = tiny_batch
    split = _lora_split(family, 1, 1)
    split.export(tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(loaded).__name__ == type(split.model).__name__
    assert loaded.config.tie_word_embeddings == split.model.config.tie_word_embeddings
    real = padding_mask(lengths, input_ids.shape[1]).bool()
    with torch.no_grad():
        assert_close_to_scale(_hf_logits(loaded, input_ids, lengths)[real], split(input_ids, lengths)[real])
    # ``fedsea info`` names the family and the valid partitions of the exported folder.
    assert main(["info", str(tmp_path / "export")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == split.head.family.name and info["num_layers"] == TINY_FAMILY_LAYERS
    assert info["partition"]["head_layers"] == [1, TINY_FAMILY_LAYERS - 2]


def test_phi3_lora_targets_its_fused_projections():
    split = fedsea.split_model(tiny_family_model("phi3"), 1, 1).add_lora(fedsea.LoraSpec(r=2))
    names = {n.split(".lora_")[0] for n, _ in split.trunk.named_parameters() if "lora_A" in n}
    assert names == {f"layers.{i}.self_attn.{m}" for i in (1, 2) for m in ("qkv_proj", "o_proj")}
    mlp = fedsea.split_model(tiny_family_model("phi3"), 1, 1)
    mlp.add_lora(fedsea.SplitLora(trunk=fedsea.LoraSpec(r=2, target_modules=("gate_proj", "up_proj", "down_proj"))))
    names = {n.split(".lora_")[0] for n, _ in mlp.trunk.named_parameters() if "lora_A" in n}
    assert names == {f"layers.{i}.mlp.{m}" for i in (1, 2) for m in ("gate_up_proj", "down_proj")}
    # A target that names no module of the family is refused, naming it (peft alone only refuses all-missing).
    bad = fedsea.split_model(tiny_family_model("qwen3"), 1, 1)
    with pytest.raises(fedsea.AdapterError, match=r"qkv_proj.*trunk"):
        bad.add_lora(fedsea.SplitLora(trunk=fedsea.LoraSpec(target_modules=("q_proj", "qkv_proj"))))


def _attention_masks_seen(split: fedsea.SplitModel, input_ids: torch.Tensor, lengths: torch.Tensor) -> list[object]:
    seen: list[object] = []
    hook = split.trunk.layers[str(split.trunk.start)].register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            split(input_ids, lengths)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_unpadded_batches_take_sdpa_is_causal_path_and_padded_ones_a_mask(family, tiny_batch):
    input_ids, lengths = tiny_batch
    split = fedsea.split_model(tiny_family_model(family), 1, 1)
    assert split.model.config._attn_implementation == "sdpa"
    full = input_ids[:1]  # the longest row: no padding
    assert _attention_masks_seen(split, full, torch.tensor([full.shape[1]])) == [None]
    (mask,) = _attention_masks_seen(split, input_ids, lengths)
    assert isinstance(mask, torch.Tensor) and mask.shape[-2:] == (input_ids.shape[1],) * 2
    assert not bool(mask[1, 0, -1, 0])  # the short row's last token does not see the padding
    # Lengths on an accelerator are not read (that would sync): the explicit mask is kept.
    assert no_padding(torch.tensor([5, 5]), 5) and not no_padding(torch.tensor([5, 4]), 5)
    assert not no_padding(torch.tensor([5, 5], device="meta"), 5)


def test_partition_range_and_unsupported_models():
    for num_layers in (3, 4, 6):
        head = partition_range(num_layers)["head_layers"]
        assert head == [1, num_layers - 2]
        for p in range(1, num_layers - 1):
            for q in range(1, num_layers - p):  # q in [1, L - 1 - p]
                check_partition(num_layers, p, q)
            with pytest.raises(fedsea.PartitionError):
                check_partition(num_layers, p, num_layers - p)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="supported: llama"):
        fedsea.split_model(gpt2, 1, 1)
    bidirectional = tiny_family_model("gemma3", use_bidirectional_attention=True)
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        fedsea.split_model(bidirectional, 1, 1)


def test_fingerprint_tells_family_quirks_apart() -> None:
    """Same weights, another soft-cap or window: a different model, so a different fingerprint."""
    from fedsea.model.fingerprint import model_fingerprint

    base = tiny_family_model("gemma2")
    capped = tiny_family_model("gemma2", final_logit_softcapping=7.0)
    windowed = tiny_family_model("gemma2", sliding_window=3)
    assert torch.equal(base.lm_head.weight, capped.lm_head.weight)
    prints = {model_fingerprint(m) for m in (base, capped, windowed)}
    assert len(prints) == 3
