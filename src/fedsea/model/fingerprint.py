"""A base model's fingerprint: a hash of its architecture config and its frozen weights.

Client and server must hold the same base model, or the split silently computes nonsense.
The fingerprint ignores LoRA tensors and peft's ``base_layer`` wrapping, and hashes weights
as float32 (name, shape, values, in sorted name order).

Hashing every weight takes minutes at 70B, so it is computed once per checkpoint:

- a folder (or a GGUF file, through its converted folder) loaded by ``load_model``: the hash
  is computed from the checkpoint's stored tensors (read one at a time from the files, on the
  CPU), not from the loaded copy, and cached in ``cache_dir()/fingerprints/<key>.json``, where
  the key hashes the folder's resolved path and the names, sizes and modification times of its
  ``*.safetensors``, ``*.bin`` and ``config.json``. So it does not depend on the dtype or device
  the model was loaded into (a bfloat16 and a float32 load give the same fingerprint), and it
  equals the weight hash of a float32 load of the checkpoint. Changing a file changes the key.
  A checkpoint that stores some base weight under another name than the model's parameter
  (a legacy layout transformers renames on load) falls back to hashing the loaded weights,
  uncached, which then depends on the load dtype.
- ``random:`` sources: a hash of (shape name, full config, seed, generator version), no
  weight pass (``fedsea.model.synthetic.random_fingerprint``).
- ``tiny-llama``, Hub ids, and models passed in directly: the weights are hashed on the
  model's own device, slice by slice (cast to float32 there, then copied to the CPU once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from fedsea.io import atomic_write_text
from fedsea.model.sources import ResolvedSource, cache_dir
from fedsea.model.synthetic import parse_random_source, random_fingerprint

logger = logging.getLogger(__name__)

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
# Family quirks (sliding windows, soft-caps, Gemma's query scale, Phi-3's partial rotary):
# hashed only where the config sets them, so LLaMA fingerprints are the same as before.
_FAMILY_KEYS = (
    "sliding_window",
    "layer_types",
    "max_window_layers",
    "use_sliding_window",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "query_pre_attn_scalar",
    "use_bidirectional_attention",
    "rope_local_base_freq",
    "partial_rotary_factor",
)


# Elements hashed per slice: bounds the float32 copy of a huge tensor (an embedding) to 256 MiB.
_HASH_SLICE = 1 << 26
_CHECKPOINT_PATTERNS = ("*.safetensors", "*.bin", "config.json")
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")


def _config_digest(model: PreTrainedModel) -> Any:
    digest = hashlib.sha256()
    config = model.config.to_dict()
    fields = {k: config.get(k) for k in _CONFIG_KEYS}
    fields |= {k: config[k] for k in _FAMILY_KEYS if config.get(k) is not None}
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return digest


def _base_names(model: PreTrainedModel) -> list[tuple[str, torch.Tensor]]:
    """(name without peft's ``.base_layer``, parameter) of every base weight, in hashing order."""
    named = [(name.replace(".base_layer", ""), p) for name, p in model.named_parameters() if "lora_" not in name]
    return sorted(named, key=lambda kv: kv[0])


def _update(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Hash name, shape and float32 values; the float32 cast happens on the tensor's device, a slice at a time."""
    digest.update(name.encode())
    digest.update(str(tuple(tensor.shape)).encode())
    flat = tensor.detach().reshape(-1)
    # sha256 is a stream: slices give the same digest as the whole tensor's bytes.
    for start in range(0, flat.numel(), _HASH_SLICE):
        piece = flat[start : start + _HASH_SLICE].to(torch.float32).cpu()
        digest.update(piece.numpy().tobytes())


def weights_fingerprint(model: PreTrainedModel) -> str:
    """``sha256:<hex>`` of the config fields above and every base weight, hashed from memory."""
    digest = _config_digest(model)
    with torch.no_grad():
        for name, param in _base_names(model):
            _update(digest, name, param)
    return f"sha256:{digest.hexdigest()}"


def checkpoint_files(folder: Path) -> list[Path]:
    """The files a checkpoint's fingerprint is keyed on, sorted."""
    return sorted({f for pattern in _CHECKPOINT_PATTERNS for f in folder.glob(pattern) if f.is_file()})


def fingerprint_cache_path(folder: str | Path) -> Path:
    """Where the cached fingerprint of the checkpoint in ``folder`` lives (it may not exist yet)."""
    root = Path(folder).resolve()
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in checkpoint_files(root)]
    key = hashlib.sha256(json.dumps([str(root), files]).encode()).hexdigest()[:32]
    return cache_dir() / "fingerprints" / f"{key}.json"


def _stored_tensors(folder: Path, stack: ExitStack) -> dict[str, Callable[[str], torch.Tensor]]:
    """name -> getter of every stored tensor: safetensors files when there are any, else ``*.bin``.

    Files are memory-mapped, and a tensor is read only when its getter is called.
    """
    getters: dict[str, Callable[[str], torch.Tensor]] = {}
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        from safetensors import safe_open

        for path in safetensors:
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            getters |= dict.fromkeys(handle.keys(), handle.get_tensor)
        return getters
    for path in sorted(folder.glob("*.bin")):
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        getters |= dict.fromkeys(state, state.__getitem__)
    return getters


def _hash_checkpoint(folder: Path, model: PreTrainedModel) -> str | None:
    """The weight hash of the stored tensors, or None if a base weight is not stored under its name.

    Same bytes in the same order as ``weights_fingerprint`` of a float32 load, one tensor in memory at a time.
    """
    names = [name for name, _ in _base_names(model)]
    with ExitStack() as stack:
        stored = _stored_tensors(folder, stack)
        if not set(names) <= set(stored):
            return None
        digest = _config_digest(model)
        for name in names:
            _update(digest, name, stored[name](name))
    return f"sha256:{digest.hexdigest()}"


def checkpoint_fingerprint(folder: str | Path, model: PreTrainedModel) -> str | None:
    """The cached fingerprint of the checkpoint in ``folder`` (computed and cached on first use).

    None when the checkpoint does not store every base weight of ``model`` under its name
    (the caller then hashes the weights in memory).
    """
    path = fingerprint_cache_path(folder)
    if path.is_file():
        try:
            value = json.loads(path.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            value = None
        if isinstance(value, str) and _FINGERPRINT.match(value):
            return value
    logger.info("hashing the checkpoint in %s once (cached in %s)", folder, path)
    value = _hash_checkpoint(Path(folder), model)
    if value is not None:
        record = {"fingerprint": value, "folder": str(Path(folder).resolve()), "key_files": _names(folder)}
        try:
            atomic_write_text(path, json.dumps(record, indent=2))
        except OSError as exc:  # a read-only cache costs a re-hash next time, nothing else
            logger.warning("cannot cache the fingerprint in %s: %s", path, exc)
    return value


def _names(folder: str | Path) -> list[str]:
    return [f.name for f in checkpoint_files(Path(folder))]


def _from_source(model: PreTrainedModel, source: ResolvedSource) -> str | None:
    if source.kind == "random":
        return random_fingerprint(parse_random_source(source.location))
    if source.kind == "folder":
        return checkpoint_fingerprint(source.location, model)
    return None


def model_fingerprint(model: PreTrainedModel) -> str:
    """``sha256:<hex>`` of the config fields above and every base weight (name, shape, values).

    Uses the source ``load_model`` recorded on the model (see the module docstring); a model
    built in Python has its weights hashed. Computed once per model object.
    """
    cached = getattr(model, "_fedsea_fingerprint", None)
    if cached is not None:
        return str(cached)
    source = getattr(model, "_fedsea_source", None)
    fingerprint = _from_source(model, source) if isinstance(source, ResolvedSource) else None
    if fingerprint is None:
        with torch.no_grad():
            fingerprint = weights_fingerprint(model)
    # Base weights are frozen: the fingerprint of a loaded model never changes.
    model._fedsea_fingerprint = fingerprint  # type: ignore[assignment]  # nn.Module.__setattr__ is typed for tensors and modules; this is a plain attribute
    return fingerprint
