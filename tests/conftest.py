"""Shared fixtures. Nothing here reaches a network: the Hub is switched off."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import fedsea

TINY_LAYERS = 6


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return fedsea.tiny_tokenizer(512)


@pytest.fixture
def tiny_model():
    """A fresh 6-block random LLaMA (width 64, 4 heads, 2 KV heads), seeded."""
    return fedsea.tiny_llama(num_layers=TINY_LAYERS, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512)


@pytest.fixture
def tiny_batch(tiny_tokenizer):
    """Three prompts of different lengths, left-padded: (input_ids (3, n), lengths (3,))."""
    texts = ["The movie was a delight from start to finish.", "Hi", "Question: is the sky blue?"]
    enc = tiny_tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"].sum(dim=1)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (converted once into the user's fedsea cache)."""
    return fedsea.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return fedsea.load_tokenizer("smollm2-135m")


def randomize_lora(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Give every LoRA tensor random values (peft initialises B to zero, which hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """max |actual - expected| <= rel * max |expected| (the issue's tolerance)."""
    scale = float(expected.abs().max())
    diff = float((actual - expected).abs().max())
    assert diff <= rel * max(scale, 1e-12), f"max abs diff {diff:.3g} > {rel} x scale {scale:.3g}"
