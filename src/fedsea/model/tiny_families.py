"""Tiny seeded random models of every supported family, built offline (tests and examples).

``tiny_family_model("gemma2")`` is a genuine ``Gemma2ForCausalLM`` (4 blocks, width 64, 4
heads of 16, 2 KV heads, the vocabulary of ``fedsea.model.tiny.tiny_tokenizer``) whose config
turns on what is particular about the family, small enough to be exercised by short prompts:

- a sliding window of ``TINY_WINDOW`` tokens (Qwen 2 on its upper blocks, Mistral and Phi-3
  on all, Gemma 2/3 alternating with full attention), so that a 10-token prompt and a few
  generated tokens already go past it;
- Gemma 2's attention and final logit soft-caps set low enough to bend the random logits;
- LLaMA 3's rope scaling (``rope_type="llama3"``);
- tied and untied embeddings across the families.
"""

from __future__ import annotations

from typing import Any

import transformers
from transformers import PreTrainedModel

from fedsea.model.seeding import seeded

TINY_WINDOW = 6  # sliding window (tokens) of the tiny sliding-window families
TINY_FAMILY_LAYERS = 4

_COMMON: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": TINY_FAMILY_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    # Larger than HF's 0.02 default so that the random model's outputs are not near uniform.
    "initializer_range": 0.1,
}
_SLIDING_GLOBAL = ["sliding_attention", "full_attention"] * (TINY_FAMILY_LAYERS // 2)

# family -> (config class, causal-LM class, the family's own settings over _COMMON)
_TINY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        # Blocks >= max_window_layers slide: blocks 0-1 full, 2-3 sliding.
        {
            "tie_word_embeddings": True,
            "use_sliding_window": True,
            "sliding_window": TINY_WINDOW,
            "max_window_layers": 2,
        },
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": False, "head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": False, "sliding_window": TINY_WINDOW}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "tie_word_embeddings": True,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": TINY_WINDOW,
            "layer_types": _SLIDING_GLOBAL,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "tie_word_embeddings": True,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": TINY_WINDOW,
            "layer_types": _SLIDING_GLOBAL,
            "final_logit_softcapping": 5.0,
        },
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"tie_word_embeddings": False, "sliding_window": TINY_WINDOW}),
}

TINY_FAMILIES: tuple[str, ...] = tuple(_TINY)


def tiny_family_config(family: str, **overrides: Any) -> transformers.PretrainedConfig:
    """The tiny config of ``family`` (a name of ``TINY_FAMILIES``), with ``overrides`` applied."""
    if family not in _TINY:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    config_class, _, settings = _TINY[family]
    config: transformers.PretrainedConfig = getattr(transformers, config_class)(**{**_COMMON, **settings, **overrides})
    return config


def tiny_family_model(family: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A seeded random causal LM of ``family`` in eval mode; the same arguments give the same weights."""
    config = tiny_family_config(family, **overrides)
    with seeded(seed):
        model: PreTrainedModel = getattr(transformers, _TINY[family][1])(config)
    model.eval()
    return model
