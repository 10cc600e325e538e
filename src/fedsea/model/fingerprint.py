"""A base model's fingerprint: a hash of its architecture config and its frozen weights.

Client and server must hold the same base model, or the split silently computes nonsense.
The fingerprint ignores LoRA tensors and peft's ``base_layer`` wrapping, and hashes weights
as float32 so that the same checkpoint gives the same fingerprint however it was loaded.
"""

from __future__ import annotations

import hashlib
import json

import torch
from transformers import PreTrainedModel

# Config fields that change the computation; bookkeeping fields (names, versions) are left out.
_CONFIG_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "hidden_act",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
)


def model_fingerprint(model: PreTrainedModel) -> str:
    """``sha256:<hex>`` of the config fields above and every base weight (name, shape, values)."""
    cached = getattr(model, "_fedsea_fingerprint", None)
    if cached is not None:
        return str(cached)
    digest = hashlib.sha256()
    config = model.config.to_dict()
    digest.update(json.dumps({k: config.get(k) for k in _CONFIG_KEYS}, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0].replace(".base_layer", "")):
            if "lora_" in name:
                continue
            digest.update(name.replace(".base_layer", "").encode())
            digest.update(str(tuple(param.shape)).encode())
            digest.update(param.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    fingerprint = f"sha256:{digest.hexdigest()}"
    # Base weights are frozen: the fingerprint of a loaded model never changes.
    model._fedsea_fingerprint = fingerprint  # type: ignore[assignment]  # nn.Module.__setattr__ is typed for tensors and modules; this is a plain attribute
    return fingerprint
