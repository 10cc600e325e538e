"""Synthetic models: published shapes with seeded random weights, built on the target device.

``random:<name>[?layers=N&seed=S]`` names a model with the exact published configuration of
``<name>`` (widths, heads, vocabulary, RoPE, norm epsilon, tied embeddings, biases) and random
weights, for capacity planning and benchmarks at the paper's scale without a download.

The model is constructed on the meta device, given uninitialised storage on the target device
in the target dtype (``to_empty``: no float32 copy of the model ever exists), then every
parameter is filled from a counter-based integer hash of (seed, parameter name, element index)
computed with int64 tensor ops on the target device. The values therefore depend on nothing
but those three: they are bit-identical on CPU and CUDA (torch's CPU and CUDA random generators
differ, so they are not used), however a tensor is sliced while filling, and a bfloat16 build
equals the float32 build cast to bfloat16. Norm weights (and other constant-initialised
modules and buffers, such as RoPE frequencies) get Hugging Face's own deterministic init.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from fedsea.errors import ModelNotFoundError
from fedsea.model.tiny import tiny_llama_config

RANDOM_PREFIX = "random:"
# Bump when the generator below changes: it is part of every random model's fingerprint.
GENERATOR_VERSION = 1
# Elements generated per slice: bounds the int64 temporaries to ~3 x 8 B x 2**24 = 384 MiB.
_SLICE = 1 << 24
_MASK32 = 0xFFFFFFFF
# The multiplier of a well-tested 32-bit integer mixer (x ^= x >> 16; x *= M; twice; x ^= x >> 16).
# M < 2**27 and x < 2**32, so every product fits in int64: the arithmetic is exact everywhere.
_MIX = 0x045D9F3B

_LLAMA2 = {"vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
_LLAMA2 |= {"max_position_embeddings": 4096, "tie_word_embeddings": False, "initializer_range": 0.02}
_LLAMA3 = {"vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001, "rms_norm_eps": 1e-5}
_LLAMA3 |= {"rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False}
_LLAMA3 |= {"initializer_range": 0.02}
# Llama 3.1's long-context RoPE scaling (as in its published config.json).
_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _llama(width: int, ffn: int, heads: int, kv: int, layers: int, base: dict[str, Any], **extra: Any) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=width,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_hidden_layers=layers,
        hidden_act="silu",
        **{**base, **extra},
    )


def _qwen25_7b() -> Qwen2Config:
    # Qwen2.5-7B's config.json; Qwen2 attention has biases on q, k and v (hard-wired in the model).
    return Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        num_hidden_layers=28,
        vocab_size=152064,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        max_position_embeddings=131072,
        sliding_window=131072,
        use_sliding_window=False,
        max_window_layers=28,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151643,
        hidden_act="silu",
        initializer_range=0.02,
    )


def _tiny_qwen2() -> Qwen2Config:
    return Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        vocab_size=512,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.1,
    )


# name -> a function building the published config (transformers config objects, in code).
SHAPES: dict[str, Callable[[], PretrainedConfig]] = {
    # The tiny test shape: ``tiny-llama``'s config (4 blocks, width 64), random weights from the hash.
    "llama-tiny": tiny_llama_config,
    "qwen2-tiny": _tiny_qwen2,
    "llama-2-7b": lambda: _llama(4096, 11008, 32, 32, 32, _LLAMA2),
    "llama-2-13b": lambda: _llama(5120, 13824, 40, 40, 40, _LLAMA2),
    "llama-2-70b": lambda: _llama(8192, 28672, 64, 8, 80, _LLAMA2),
    "llama-3-8b": lambda: _llama(4096, 14336, 32, 8, 32, _LLAMA3),
    "llama-3-70b": lambda: _llama(8192, 28672, 64, 8, 80, _LLAMA3),
    "llama-3.1-8b": lambda: _llama(
        4096, 14336, 32, 8, 32, _LLAMA3, rope_scaling=_LLAMA31_ROPE, max_position_embeddings=131072
    ),
    "qwen2.5-7b": _qwen25_7b,
}
_ARCHITECTURES: dict[str, type[PreTrainedModel]] = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}
_OPTIONS = ("layers", "seed")


@dataclass(frozen=True)
class RandomSpec:
    """A parsed ``random:`` source: the shape's name, its block count override and the seed."""

    name: str
    layers: int | None = None
    seed: int = 0

    @property
    def source(self) -> str:
        """The canonical source string (options in a fixed order, defaults left out)."""
        options = ([f"layers={self.layers}"] if self.layers is not None else []) + (
            [f"seed={self.seed}"] if self.seed else []
        )
        return RANDOM_PREFIX + self.name + ("?" + "&".join(options) if options else "")


def is_random_source(text: str) -> bool:
    """Whether ``text`` names a synthetic model (starts with ``random:``)."""
    return text.startswith(RANDOM_PREFIX)


def parse_random_source(text: str) -> RandomSpec:
    """Parse ``random:<name>[?layers=N&seed=S]``.

    Raises:
        ModelNotFoundError: an unknown shape name (the message lists the known ones).
        ValueError: an unknown, repeated or malformed option.
    """
    if not is_random_source(text):
        raise ValueError(f"not a random model source (expected {RANDOM_PREFIX}<name>): {text!r}")
    name, _, query = text[len(RANDOM_PREFIX) :].partition("?")
    if name not in SHAPES:
        raise ModelNotFoundError(f"no random model shape {name!r}; known shapes: {', '.join(SHAPES)}")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError as exc:
        raise ValueError(f"{text!r}: options must read key=value&key=value ({', '.join(_OPTIONS)})") from exc
    values: dict[str, int] = {}
    for key, value in pairs:
        if key not in _OPTIONS:
            raise ValueError(f"{text!r}: unknown option {key!r}; options are {', '.join(_OPTIONS)}")
        if key in values:
            raise ValueError(f"{text!r}: option {key!r} given twice")
        if not (value.isascii() and value.isdigit()):
            raise ValueError(f"{text!r}: option {key}={value!r} must be a non-negative integer")
        values[key] = int(value)
    layers = values.get("layers")
    full = int(SHAPES[name]().num_hidden_layers)
    if layers is not None and not 1 <= layers <= full:
        raise ValueError(f"{text!r}: layers={layers} must be between 1 and {name}'s {full} blocks")
    return RandomSpec(name, layers, values.get("seed", 0))


def random_config(spec: RandomSpec) -> PretrainedConfig:
    """The published config of ``spec.name`` with ``spec.layers`` blocks when given."""
    config = SHAPES[spec.name]()
    if spec.layers is not None:
        config.num_hidden_layers = spec.layers
        if getattr(config, "layer_types", None) is not None:  # per-block attention kinds (Qwen2)
            config.layer_types = config.layer_types[: spec.layers]
        if getattr(config, "max_window_layers", None) is not None:
            config.max_window_layers = min(config.max_window_layers, spec.layers)
    return config


def random_fingerprint(spec: RandomSpec) -> str:
    """``sha256:<hex>`` of (shape name, full config, seed, generator version): no weight pass.

    Independent of the dtype and device the weights are built in (the config's dtype field is
    left out), as the weights themselves are, up to the cast.
    """
    config = random_config(spec).to_dict()
    for volatile in ("dtype", "torch_dtype", "transformers_version", "_name_or_path"):
        config.pop(volatile, None)
    ident = {"generator": GENERATOR_VERSION, "name": spec.name, "seed": spec.seed, "config": config}
    return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _key32(seed: int, name: str, salt: str) -> int:
    """A 32-bit key from (seed, parameter name): decorrelates the tensors' index streams."""
    digest = hashlib.sha256(f"{GENERATOR_VERSION}:{seed}:{name}:{salt}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit integer mixer on int64 values in [0, 2**32), in place; exact (no overflow)."""
    for _ in range(2):
        x.bitwise_xor_(x >> 16).mul_(_MIX).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 16)


def hashed_uniform(numel: int, start: int, seed: int, name: str, device: torch.device | str) -> torch.Tensor:
    """Elements ``start .. start + numel`` of tensor ``name``'s stream: float32 in [-1, 1), shape (numel,).

    Element i is a function of (seed, name, i) alone, computed with exact int64 arithmetic, so
    the values are the same on every device and for every slicing. 24 bits of the hash make
    a float32 that is exact on every device: (h >> 8) / 2**23 - 1.
    """
    if start + numel > 1 << 32:
        raise ValueError(f"{name}: the generator indexes at most 2**32 elements per tensor")
    k1, k2 = _key32(seed, name, "a"), _key32(seed, name, "b")
    x = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    # Index i (< 2**32) scrambled by the tensor's two keys (xor, then add: two tensors' streams are
    # not shifted copies of each other), then mixed.
    x = _mix32(x.bitwise_xor_(k2).add_(k1).bitwise_and_(_MASK32))
    centred = (x >> 8).sub_(1 << 23)  # in [-2**23, 2**23): exact in float32
    return centred.to(torch.float32).mul_(2.0**-23)


@torch.no_grad()
def fill_hashed_(param: torch.Tensor, name: str, seed: int, std: float, slice_size: int = _SLICE) -> None:
    """Fill ``param`` in place with ``std * sqrt(3) * U[-1, 1)`` (standard deviation ``std``), slice by slice.

    Each slice is generated in float32 on the parameter's device and cast once to its dtype,
    so peak extra memory is a few slices, never a float32 copy of the tensor.
    """
    flat = param.view(-1)
    # sqrt(3) makes a uniform's standard deviation equal to std (the scale HF's normal init uses).
    scale = torch.tensor(std * math.sqrt(3.0), dtype=torch.float32, device=flat.device)
    for start in range(0, flat.numel(), slice_size):
        n = min(slice_size, flat.numel() - start)
        flat[start : start + n].copy_(hashed_uniform(n, start, seed, name, flat.device).mul_(scale))


def _is_constant_init(module: nn.Module) -> bool:
    """Modules whose HF init is a constant (norms: ones, or zeros in Gemma) or holds buffers (RoPE)."""
    kind = type(module).__name__
    return "Norm" in kind or any(True for _ in module.buffers(recurse=False))


def build_random_model(
    spec: RandomSpec,
    dtype: torch.dtype,
    device: torch.device | str,
    place: Callable[[nn.Module], object] | None = None,
) -> PreTrainedModel:
    """Build ``spec``'s model directly on ``device`` in ``dtype``, in eval mode with frozen weights.

    ``place``, if given, is called on the model while it is still on the meta device and
    allocates its modules where they belong instead of ``device`` (``fedsea.model.device``'s
    ``place_blocks`` over several GPUs: each block's weights are made on its own GPU, and no
    copy of the whole model ever sits in host memory). The values do not depend on where.
    """
    config = random_config(spec)
    cls = _ARCHITECTURES[str(config.model_type)]
    target = torch.device(device)
    with torch.device("meta"):
        model = cls(config)
        # Parameters only: buffers keep their own dtype (RoPE frequencies stay float32, as
        # in a Hugging Face load in bfloat16). On the meta device this allocates nothing.
        for param in model.parameters():
            param.data = param.data.to(dtype)
    if place is not None:
        place(model)
    else:
        model = model.to_empty(device=target)
    # to_empty gives each module its own new tensor, which unties shared weights: tie again.
    model.tie_weights()
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    with torch.no_grad():
        # HF's own init for norms and for modules with buffers (RoPE's inverse frequencies):
        # constants and formulas, the same on every device.
        constant = [m for m in model.modules() if _is_constant_init(m)]
        for module in constant:
            model._init_weights(module)
        # Every parameter but the norms': hashed values (weights and biases alike; a module with
        # buffers, such as a scaled embedding, keeps HF's buffers but gets hashed weights).
        norms = [m for m in constant if "Norm" in type(m).__name__]
        skip = {id(p) for m in norms for p in m.parameters(recurse=False)}
        for name, param in model.named_parameters():
            if id(param) not in skip:
                fill_hashed_(param, name, spec.seed, std)
    model.requires_grad_(False)
    built: PreTrainedModel = model.eval()
    return built
