"""Synthetic ``random:`` models: published shapes, seeded device-independent weights, fingerprints."""

from __future__ import annotations

import json

import pytest
import torch

import fedsea
from fedsea.errors import ModelNotFoundError
from fedsea.model.fingerprint import fingerprint_cache_path, model_fingerprint, weights_fingerprint
from fedsea.model.load import load_model, load_tokenizer, resolve_source
from fedsea.model.synthetic import (
    RandomSpec,
    build_random_model,
    fill_hashed_,
    hashed_uniform,
    parse_random_source,
    random_config,
)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def test_same_source_builds_identical_weights_and_bf16_is_the_fp32_cast():
    a = load_model("random:llama-tiny?seed=3")
    b = load_model("random:llama-tiny?seed=3")
    half = load_model("random:llama-tiny?seed=3", dtype="bfloat16")
    other = load_model("random:llama-tiny?seed=4")
    sa, sb, sh, so = _state(a), _state(b), _state(half), _state(other)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(sh[k].dtype == torch.bfloat16 and torch.equal(sa[k].to(torch.bfloat16), sh[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], so["model.layers.0.self_attn.q_proj.weight"])
    # RoPE frequencies stay float32 in a bfloat16 build (as in a Hugging Face load), norms are ones.
    assert half.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(a.model.rotary_emb.inv_freq, fedsea.tiny_llama().model.rotary_emb.inv_freq)
    assert torch.equal(sa["model.norm.weight"], torch.ones(64))
    # The tiny config's init scale (0.1) as a standard deviation; tied embeddings stay tied.
    assert 0.09 < float(sa["model.layers.0.mlp.up_proj.weight"].std()) < 0.11
    assert a.lm_head.weight is a.model.embed_tokens.weight


def test_values_do_not_depend_on_the_slicing():
    whole = hashed_uniform(10_000, 0, 7, "w", "cpu")
    parts = torch.cat([hashed_uniform(n, s, 7, "w", "cpu") for s, n in ((0, 1), (1, 4095), (4096, 5904))])
    assert torch.equal(whole, parts)
    assert float(whole.min()) >= -1.0 and float(whole.max()) < 1.0 and abs(float(whole.mean())) < 0.03
    # A parameter filled in slices of 1000 equals one filled in one go.
    x, y = torch.empty(37, 101), torch.empty(37, 101, dtype=torch.bfloat16)
    fill_hashed_(x, "p", 0, 0.02, slice_size=1000)
    fill_hashed_(y, "p", 0, 0.02)
    assert torch.equal(x.to(torch.bfloat16), y)
    assert not torch.equal(hashed_uniform(100, 0, 7, "w", "cpu"), hashed_uniform(100, 0, 7, "v", "cpu"))


def test_llama_2_7b_one_block_has_the_real_shapes_in_bf16():
    model = load_model("random:llama-2-7b?layers=1", dtype="bfloat16")
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (4096, 11008, 32000)
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers) == (32, 32, 1)
    params = _state(model)
    assert params["model.layers.0.mlp.gate_proj.weight"].shape == (11008, 4096)
    assert params["lm_head.weight"].shape == (32000, 4096)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in params.values())
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert 0.015 < float(params["model.layers.0.self_attn.q_proj.weight"][:64].float().std()) < 0.025


def test_published_configs():
    l3 = random_config(RandomSpec("llama-3-8b"))
    assert (l3.hidden_size, l3.intermediate_size, l3.num_key_value_heads, l3.vocab_size) == (4096, 14336, 8, 128256)
    assert l3.rope_parameters["rope_theta"] == 500000.0 and not l3.tie_word_embeddings
    l70 = random_config(RandomSpec("llama-3-70b"))
    assert (l70.hidden_size, l70.num_hidden_layers, l70.num_attention_heads, l70.num_key_value_heads) == (
        8192,
        80,
        64,
        8,
    )
    l31 = random_config(RandomSpec("llama-3.1-8b"))
    assert l31.rope_parameters["rope_type"] == "llama3" and l31.rope_parameters["factor"] == 8.0
    qwen = random_config(RandomSpec("qwen2.5-7b", layers=2))
    assert (qwen.hidden_size, qwen.intermediate_size, qwen.num_attention_heads, qwen.num_key_value_heads) == (
        3584,
        18944,
        28,
        4,
    )
    assert (qwen.vocab_size, qwen.rms_norm_eps, qwen.rope_parameters["rope_theta"]) == (152064, 1e-6, 1e6)
    assert qwen.num_hidden_layers == 2 and len(qwen.layer_types) == 2


def test_qwen_builds_with_attention_biases():
    # Split support for Qwen2 comes with the model families; here only the build is checked.
    model = build_random_model(parse_random_source("random:qwen2-tiny"), torch.float32, "cpu")
    bias = model.model.layers[0].self_attn.q_proj.bias
    assert bias is not None and bias.abs().max() > 0
    again = build_random_model(parse_random_source("random:qwen2-tiny"), torch.bfloat16, "cpu")
    assert torch.equal(
        again.model.layers[0].self_attn.k_proj.bias, model.model.layers[0].self_attn.k_proj.bias.bfloat16()
    )
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()
    # Qwen2 is a supported family: the random shape loads and splits exactly.
    loaded = load_model("random:qwen2-tiny")
    split = fedsea.model.split.split_model(loaded, 1, 1)
    ids, lengths = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]]), torch.tensor([3, 4])
    expected = fedsea.model.split.central_forward(loaded, ids, lengths)
    torch.testing.assert_close(split(ids, lengths), expected, rtol=1e-5, atol=1e-5)


def test_bad_sources_are_clear_errors():
    with pytest.raises(ModelNotFoundError, match=r"no random model shape 'llama-9'.*llama-2-7b.*qwen2\.5-7b"):
        load_model("random:llama-9")
    for bad, message in (
        ("random:llama-tiny?layers=x", "non-negative integer"),
        ("random:llama-tiny?layers=9", "between 1 and"),
        ("random:llama-tiny?depth=2", "unknown option 'depth'"),
        ("random:llama-tiny?seed=1&seed=2", "given twice"),
        ("random:llama-tiny?seed", "key=value"),
    ):
        with pytest.raises(ValueError, match=message):
            resolve_source(bad)
    assert resolve_source("random:llama-tiny?seed=0&layers=2").location == "random:llama-tiny?layers=2"


def test_tokenizer_fits_the_vocabulary():
    tokenizer = load_tokenizer("random:llama-2-7b")
    ids = tokenizer("any text at all, ünïcödé")["input_ids"]
    assert max(ids) < 32000 and tokenizer.padding_side == "left"


def test_random_fingerprint_needs_no_weights_and_tells_seeds_and_layers_apart():
    a, b = load_model("random:llama-tiny"), load_model("random:llama-tiny", dtype="bfloat16")
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(load_model("random:llama-tiny?seed=1")) != model_fingerprint(a)
    assert model_fingerprint(load_model("random:llama-tiny?layers=3")) != model_fingerprint(a)


def test_folder_fingerprint_is_cached_dtype_free_and_equals_the_weight_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSEA_CACHE", str(tmp_path / "cache"))
    reference = fedsea.tiny_llama(seed=2)
    reference.save_pretrained(tmp_path / "ckpt")
    cache = fingerprint_cache_path(tmp_path / "ckpt")
    assert not cache.exists()
    first = model_fingerprint(load_model(tmp_path / "ckpt"))
    # The old way: every weight of the model in memory, hashed as float32.
    assert first == weights_fingerprint(reference)
    assert json.loads(cache.read_text())["fingerprint"] == first
    # A bfloat16 load reads the cached value (hashing its weights would give another).
    half = load_model(tmp_path / "ckpt", dtype="bfloat16")
    assert model_fingerprint(half) == first != weights_fingerprint(half)
    # Another checkpoint is another key and another fingerprint.
    fedsea.tiny_llama(seed=3).save_pretrained(tmp_path / "other")
    assert fingerprint_cache_path(tmp_path / "other") != cache
    assert model_fingerprint(load_model(tmp_path / "other")) != first


def test_a_spread_random_model_is_built_block_by_block_with_the_same_weights():
    """``random:`` over several devices: each block allocated where it goes (from the meta device), same values."""
    from fedsea.model.device import place_blocks
    from fedsea.model.synthetic import build_random_model

    spec = parse_random_source("random:llama-tiny?seed=2")
    devices = [torch.device("cpu")] * 3  # stands in for 3 GPUs: the same code path, moves are no-ops
    spread = build_random_model(spec, torch.float32, "cpu", place=lambda m: place_blocks(m, devices))
    plain = build_random_model(spec, torch.float32, "cpu")
    assert len(spread.fedsea_block_devices) == spread.config.num_hidden_layers
    assert not any(p.is_meta for p in spread.parameters()) and not any(b.is_meta for b in spread.buffers())
    assert spread.lm_head.weight is spread.model.embed_tokens.weight or not spread.config.tie_word_embeddings
    sa, sb = _state(spread), _state(plain)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(spread(ids).logits, plain(ids).logits)


def test_info_describes_a_published_shape_without_building_its_weights(capsys):
    """``fedsea info random:llama-2-7b``: the real parameter count, from the meta device."""
    import json

    from fedsea.cli.main import main

    assert main(["info", "random:llama-2-7b"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["family"], info["num_layers"], info["hidden_size"]) == ("random", "llama", 32, 4096)
    assert info["parameters"] == 6_738_415_616  # LLaMA-2-7B
    assert info["weights_gib"]["bfloat16"] == round(6_738_415_616 * 2 / 2**30, 2)
    assert info["partition"]["head_layers"] == [1, 30]
