"""LoRA per part: configs per part, save/load round trip, merge and export."""

from __future__ import annotations

import json

import pytest
import torch

import fedsea
from fedsea.model.adapters import adapter_state_dict, load_adapter, save_adapter
from tests.conftest import assert_close_to_scale, randomize_lora


def _model():
    return fedsea.tiny_llama(num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512)


def test_each_part_gets_its_own_lora_config():
    split = fedsea.split_model(_model(), 2, 1)
    split.add_lora(
        fedsea.SplitLora(
            head=fedsea.LoraSpec(r=2, alpha=4, dropout=0.0, target_modules=("q_proj",)),
            trunk=fedsea.LoraSpec(r=8, alpha=16, dropout=0.1, target_modules=("q_proj", "v_proj", "down_proj")),
            tail=None,
        )
    )
    head = adapter_state_dict(split.head)
    trunk = adapter_state_dict(split.trunk)
    assert sorted(head) == sorted(f"layers.{i}.self_attn.q_proj.lora_{x}.weight" for i in (0, 1) for x in "AB")
    assert head["layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 64)
    assert trunk["layers.2.mlp.down_proj.lora_A.weight"].shape == (8, 128)
    assert len(trunk) == 3 * 3 * 2
    assert adapter_state_dict(split.tail) == {}
    trainable = {n for n, p in split.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_adapter_added_to_an_eval_model_is_deterministic(tiny_batch):
    """peft creates LoRA modules in training mode; a model in eval mode must not get dropout."""
    model = _model().eval()
    split = fedsea.split_model(model, 2, 1).add_lora(fedsea.LoraSpec(r=4, dropout=0.5))
    randomize_lora(model, seed=3)
    input_ids, lengths = tiny_batch
    with torch.no_grad():
        first, second = split(input_ids, lengths), split(input_ids, lengths)
    assert torch.equal(first, second)
    split.head.train()  # training turns the adapter's dropout on again
    assert all(m.training for n, m in split.head.named_modules() if "lora_dropout" in n)


def test_unknown_target_module_is_a_clear_error():
    split = fedsea.split_model(_model(), 1, 1)
    with pytest.raises(fedsea.AdapterError, match="head"):
        split.add_lora(fedsea.SplitLora(head=fedsea.LoraSpec(target_modules=("no_such_proj",))))


def test_save_load_round_trip(tmp_path, tiny_batch):
    split = fedsea.split_model(_model(), 2, 2).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=7)
    split.save_adapters(tmp_path / "adapters")
    meta = json.loads((tmp_path / "adapters" / "trunk" / "adapter_config.json").read_text())
    assert meta["part"] == "trunk" and meta["layers"] == [2, 4] and meta["lora"]["r"] == 4

    fresh = fedsea.split_model(_model(), 2, 2).load_adapters(tmp_path / "adapters")
    for part in ("head", "trunk", "tail"):
        a, b = adapter_state_dict(getattr(split, part)), adapter_state_dict(getattr(fresh, part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    input_ids, lengths = tiny_batch
    with torch.no_grad():
        assert torch.equal(split(input_ids, lengths), fresh(input_ids, lengths))


def test_loading_into_a_part_with_other_layers_fails_clearly(tmp_path):
    split = fedsea.split_model(_model(), 2, 2).add_lora(fedsea.LoraSpec(r=4))
    save_adapter(split.head, tmp_path / "head")
    other = fedsea.split_model(_model(), 3, 2).add_lora(fedsea.LoraSpec(r=4))
    with pytest.raises(fedsea.AdapterError, match="missing"):
        load_adapter(other.head, tmp_path / "head")
    mismatched = fedsea.split_model(_model(), 2, 2).add_lora(fedsea.LoraSpec(r=8))
    with pytest.raises(fedsea.AdapterError, match="r=4"):
        load_adapter(mismatched.head, tmp_path / "head")
    with pytest.raises(fedsea.AdapterError, match="not an adapter folder"):
        load_adapter(other.head, tmp_path)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    import fedsea.model.adapters as adapters_module

    split = fedsea.split_model(_model(), 1, 1).add_lora(fedsea.LoraSpec(r=2))
    target = tmp_path / "adapters"
    split.save_adapters(target)
    before = (target / "head" / "adapter_model.safetensors").read_bytes()
    randomize_lora(split.model, seed=3)
    real_save = adapters_module.save_file
    calls = []

    def failing_save(*args, **kwargs):  # the disk fills up while the tail is written
        calls.append(1)
        if len(calls) == 3:
            raise OSError("No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(adapters_module, "save_file", failing_save)
    with pytest.raises(OSError, match="No space"):
        split.save_adapters(target)
    assert (target / "head" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]


def test_merge_and_export_gives_a_plain_hf_model(tmp_path, tiny_batch, tiny_tokenizer):
    split = fedsea.split_model(_model(), 2, 1).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=11)
    out = split.export(tmp_path / "merged", tiny_tokenizer)
    exported = fedsea.load_model(out)
    assert type(exported).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in exported.named_parameters())
    input_ids, lengths = tiny_batch
    with torch.no_grad():
        ours = split(input_ids, lengths)
        theirs = fedsea.central_forward(exported, input_ids, lengths)
    assert_close_to_scale(theirs, ours)
    # The adapters did change the model: merging is not a no-op.
    base = fedsea.central_forward(_model(), input_ids, lengths).detach()
    assert float((base - ours).abs().max()) > 1e-3
    assert fedsea.load_tokenizer(out)("hi")["input_ids"] == tiny_tokenizer("hi")["input_ids"]
