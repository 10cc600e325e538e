"""A generation survives a kill -9 and restart of ``fedsea serve``: the same tokens as without.

The client reconnects, opens a new session with the same trunk adapter, and replays the noised
head states it sent (never fresh noise) to rebuild the trunk's cache. The noise is strong
enough that another draw changes the tokens, so a replay of fresh noise would be caught.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

import fedsea
from fedsea.client.deadlines import ClientTimeouts
from fedsea.config import NoiseConfig
from fedsea.errors import RemoteError
from tests.integration.test_cli_wire import _free_port
from tests.integration.test_deadlines import end, packaged_split, serve

PROMPT = "Hello there, how are"
NEW_TOKENS = 16


def _pieces(address: str, tokenizer: object, noise_seed: int, kill_after: int | None = None) -> tuple[list[str], dict]:
    """Stream one answer; after ``kill_after`` pieces, kill -9 the server and start it again (same port)."""
    noise = NoiseConfig(sigma=0.5, seed=noise_seed)
    timeouts = ClientTimeouts(reconnect_timeout_s=90)
    pieces: list[str] = []
    with fedsea.SplitClient(address, packaged_split(), noise=noise, tokenizer=tokenizer, timeouts=timeouts) as client:
        for piece in client.stream(PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=(), chat=False):
            pieces.append(piece)
            if kill_after is not None and len(pieces) == kill_after:
                _restart()
        return pieces, client.stats()


_SERVER: dict[str, Any] = {}


def _restart() -> None:
    proc = _SERVER["proc"]
    proc.kill()  # SIGKILL: no goodbye, the stream breaks mid-generation
    proc.wait(timeout=30)
    _SERVER["proc"] = serve(_SERVER["port"])


def test_generation_survives_a_server_restart_token_identical(tiny_tokenizer):
    port = _free_port()
    _SERVER["port"] = port
    _SERVER["proc"] = serve(port)
    address = f"127.0.0.1:{port}"
    try:
        reference, clean = _pieces(address, tiny_tokenizer, noise_seed=11)
        other, _ = _pieces(address, tiny_tokenizer, noise_seed=12)
        resumed, stats = _pieces(address, tiny_tokenizer, noise_seed=11, kill_after=3)
    finally:
        end(_SERVER["proc"])
    assert len(reference) > 3 and "".join(other) != "".join(reference)  # the noise shows in the tokens
    assert "".join(resumed) == "".join(reference)
    # The generation was cut off and replayed once: the prefill and the decode steps before the cut.
    assert "generate_replay" not in clean["rpcs"]
    assert stats["rpcs"]["generate_replay"]["calls"] == 1
    assert stats["rpcs"]["generate_replay"]["bytes_sent"] > 0


def _drive(client: fedsea.SplitClient, cut: bool) -> list[torch.Tensor]:
    """Prefill two rows, decode, rewind, drop a row (keep_rows), decode: the trunk's answers.

    ``cut``: kill -9 and restart the server before the last step, which must then replay the
    prefill, the decode step, the rewind and the keep_rows step, in that order.
    """
    gen = torch.Generator().manual_seed(5)
    d = client.split.model.config.hidden_size
    stepper = client.stepper(max_length=16)
    outs = [stepper.step(0, torch.randn(2, 5, d, generator=gen), torch.tensor([5, 3]), None)]
    outs.append(stepper.step(1, torch.randn(2, 1, d, generator=gen), None, None))
    stepper.rewind(5)  # drop the decode step's slot: the next step writes slot 5 again
    outs.append(stepper.step(2, torch.randn(2, 1, d, generator=gen), None, None))
    outs.append(stepper.step(3, torch.randn(1, 1, d, generator=gen), None, [1]))
    if cut:
        _restart()
    outs.append(stepper.step(4, torch.randn(1, 1, d, generator=gen), None, None))
    assert stepper.resumes == int(cut)
    stepper.close()
    return outs


def test_the_replay_keeps_rewinds_and_dropped_rows_in_order():
    port = _free_port()
    _SERVER["port"] = port
    _SERVER["proc"] = serve(port)
    address = f"127.0.0.1:{port}"
    try:
        with fedsea.SplitClient(address, packaged_split()) as client:
            whole = _drive(client, cut=False)
        with fedsea.SplitClient(address, packaged_split()) as client:
            resumed = _drive(client, cut=True)
    finally:
        end(_SERVER["proc"])
    for a, b in zip(whole, resumed, strict=True):
        assert torch.equal(a, b)


def test_a_server_that_does_not_come_back_is_a_clear_unavailable(tiny_tokenizer):
    port = _free_port()
    proc = serve(port)
    address = f"127.0.0.1:{port}"
    timeouts = ClientTimeouts(reconnect_timeout_s=2)
    try:
        with fedsea.SplitClient(address, packaged_split(), tokenizer=tiny_tokenizer, timeouts=timeouts) as client:
            pieces = client.stream(PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=(), chat=False)
            next(pieces)
            proc.kill()
            proc.wait(timeout=30)
            start = time.monotonic()
            with pytest.raises(RemoteError) as caught:
                list(pieces)
            took = time.monotonic() - start
    finally:
        end(proc)
    assert caught.value.code == "UNAVAILABLE"
    assert f"server {address} lost mid-generation and not back within 2 s" in str(caught.value)
    assert took <= 2 + 2.0


def test_a_trunk_adapter_trained_on_the_lost_server_is_a_clear_refusal_to_resume(tiny_tokenizer):
    port = _free_port()
    proc = serve(port)
    batch = fedsea.make_batch([tiny_tokenizer("A short text to train on.")["input_ids"]], tiny_tokenizer.pad_token_id)
    try:
        with fedsea.SplitClient(f"127.0.0.1:{port}", packaged_split(), tokenizer=tiny_tokenizer) as client:
            client.train_step(batch)  # the server's trunk adapter is now one this client does not hold
            pieces = client.stream(PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=(), chat=False)
            next(pieces)
            proc.kill()
            proc.wait(timeout=30)
            with pytest.raises(RemoteError, match=r"lost mid-generation .* cannot resume: .*trunk adapter") as caught:
                list(pieces)
    finally:
        end(proc)
    assert caught.value.code == "UNAVAILABLE"
