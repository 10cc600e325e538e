"""Loading: the tiny factory, Hugging Face folders, the cache location, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import fedsea
from fedsea.cli import main
from fedsea.model.load import cache_dir, resolve_source


def test_tiny_factory_is_seeded_and_configurable():
    a = fedsea.tiny_llama(num_layers=3, hidden_size=48, num_heads=6, num_kv_heads=3, vocab_size=400, seed=1)
    b = fedsea.tiny_llama(num_layers=3, hidden_size=48, num_heads=6, num_kv_heads=3, vocab_size=400, seed=1)
    c = fedsea.tiny_llama(num_layers=3, hidden_size=48, num_heads=6, num_kv_heads=3, vocab_size=400, seed=2)
    assert a.config.num_hidden_layers == 3 and a.config.hidden_size == 48 and a.config.vocab_size == 400
    assert a.config.num_attention_heads == 6 and a.config.num_key_value_heads == 3
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_tokenizer_round_trips_text_and_has_a_chat_template(tiny_tokenizer):
    text = "Hospitals, banks & firms: 42 ünïcödé words!"
    ids = tiny_tokenizer(text)["input_ids"]
    assert max(ids) < 512 and tiny_tokenizer.decode(ids) == text
    chat = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer.padding_side == "left"
    assert (tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id) == (1, 2, 2)


def test_hf_folder_round_trip(tmp_path, tiny_model, tiny_tokenizer):
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = fedsea.load_model(tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    sd, ref = loaded.state_dict(), tiny_model.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert fedsea.load_tokenizer(tmp_path)("hello")["input_ids"] == tiny_tokenizer("hello")["input_ids"]
    assert fedsea.load_model(tmp_path, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        fedsea.load_model(tmp_path, dtype="float99")


def test_sources_resolve_as_documented(tmp_path, monkeypatch):
    assert resolve_source("tiny-llama").kind == "tiny"
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    monkeypatch.setenv("FEDSEA_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FEDSEA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "fedsea"


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(fedsea.FedseaError, match="HuggingFaceTB/not-a-model"):
        fedsea.load_model("HuggingFaceTB/not-a-model")


def test_cli_info_and_demo_on_the_tiny_model(capsys):
    assert main(["info", "tiny-llama"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_layers"] == 4 and info["architecture"] == "LlamaForCausalLM"
    assert (
        main(
            [
                "demo",
                "--split-only",
                "--model",
                "tiny-llama",
                "--head-layers",
                "1",
                "--tail-layers",
                "1",
                "--max-new-tokens",
                "6",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "identical  yes" in out and "head -> trunk" in out


def test_cli_errors_exit_2_with_a_message(capsys):
    assert main(["demo", "--split-only", "--model", "tiny-llama", "--head-layers", "3", "--tail-layers", "1"]) == 2
    assert "head_layers + tail_layers must be < the model's 4 blocks" in capsys.readouterr().err
    assert main(["info", "/no/such/model"]) == 2
    assert "no model at '/no/such/model'" in capsys.readouterr().err
