"""A real trunk server on a free loopback port, in a background thread of the test process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import fedsea
from fedsea.config import ServerLimits
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.trunk import TrunkHost
from fedsea.training import make_batch
from fedsea.wire.auth import TokenStore
from tests.conftest import randomize_lora

TINY = {"num_layers": 6, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 512}


def tiny_split(p: int = 2, q: int = 1, lora: fedsea.LoraSpec | None = None) -> fedsea.SplitModel:
    """The tiny model split with random LoRA everywhere (identical for identical arguments)."""
    split = fedsea.split_model(fedsea.tiny_llama(**TINY), p, q).add_lora(lora or fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=1)
    return split


def tiny_batch(tokenizer: Any, texts: list[str] | None = None) -> fedsea.Batch:
    texts = texts or ["Review: sharp writing and warm performances.", "Dull.", "The council approved a new park."]
    return make_batch([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)


@contextmanager
def running_server(
    limits: ServerLimits | None = None, tokens: TokenStore | None = None, tls: Any = None
) -> Iterator[str]:
    host = TrunkHost(fedsea.tiny_llama(**TINY), limits)
    thread = ServerThread(TrunkServer(host, tokens=tokens, tls=tls))
    port = thread.start()
    try:
        yield f"localhost:{port}"
    finally:
        thread.stop()


@pytest.fixture
def server() -> Iterator[str]:
    with running_server() as address:
        yield address


@pytest.fixture
def make_server() -> Callable[..., Any]:
    return running_server
