"""Deadlines and liveness: a frozen (SIGSTOPped) ``fedsea serve`` is an error in bounded time.

The server is a real ``fedsea serve`` subprocess (a thread cannot be frozen); every test
that stops it lets it go on (SIGCONT) afterwards, so the module shares one server.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import fedsea
from fedsea.cli.main import build_parser
from fedsea.client.deadlines import ClientTimeouts, ServerNotAnsweringError
from fedsea.federation.client import FederatedClient
from fedsea.federation.config import FedConfig
from fedsea.federation.coordinator import coordinator_factory
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.trunk import TrunkHost
from fedsea.training.data import encode_example
from tests.conftest import randomize_lora
from tests.integration.conftest import TINY
from tests.integration.test_cli_wire import ENV, FEDSEA, _free_port, _wait_for

SLACK_S = 2.0  # scheduling on a loaded CI machine


def serve(port: int) -> subprocess.Popen[str]:
    """``fedsea serve`` of the packaged tiny model on ``port`` (plaintext, loopback), once listening."""
    proc = subprocess.Popen(
        [*FEDSEA, "serve", "--model", "tiny-llama", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    try:
        _wait_for(proc, "listening on 127.0.0.1")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def end(proc: subprocess.Popen[str]) -> None:
    """Let a stopped server go on, then kill it."""
    proc.send_signal(signal.SIGCONT)
    proc.kill()
    proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def frozen_able() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = _free_port()
    proc = serve(port)
    try:
        yield f"127.0.0.1:{port}", proc
    finally:
        end(proc)


@contextmanager
def frozen(proc: subprocess.Popen[str]) -> Iterator[None]:
    """The server stopped (SIGSTOP: its sockets stay open, nothing answers), then let go on."""
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


def within(seconds: float, fn: Callable[[], object]) -> tuple[BaseException | None, float]:
    """Run ``fn`` in a thread; it must end within ``seconds``. Returns what it raised and how long it took."""
    out: dict[str, Any] = {}

    def go() -> None:
        start = time.monotonic()
        try:
            fn()
        except BaseException as exc:
            out["error"] = exc
        out["took"] = time.monotonic() - start

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    return out.get("error"), out["took"]


def packaged_split() -> fedsea.SplitModel:
    """``tiny-llama`` (what ``fedsea serve --model tiny-llama`` holds) with random LoRA everywhere."""
    split = fedsea.split_model(fedsea.load_model("tiny-llama"), 1, 1).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=3)
    return split


def test_a_frozen_server_is_not_answering_within_the_call_deadline(frozen_able):
    address, proc = frozen_able
    client = fedsea.SplitClient(address, packaged_split(), timeouts=ClientTimeouts(call_timeout_s=2))
    with frozen(proc):
        error, took = within(2 + 2 * SLACK_S, client.connect)
    assert isinstance(error, ServerNotAnsweringError) and error.code == "DEADLINE_EXCEEDED"
    assert f"server {address} not answering for 2 s" in str(error) and "--call-timeout-s" in str(error)
    assert 2 - 0.1 <= took <= 2 + SLACK_S


def test_a_training_step_to_a_frozen_server_ends_at_the_step_deadline(frozen_able, tiny_tokenizer):
    address, proc = frozen_able
    batch = fedsea.make_batch([tiny_tokenizer("A short text to train on.")["input_ids"]], tiny_tokenizer.pad_token_id)
    with fedsea.SplitClient(address, packaged_split(), timeouts=ClientTimeouts(step_timeout_s=2)) as client:
        client.train_step(batch)  # the server answers while it runs
        with frozen(proc):
            error, took = within(2 + 2 * SLACK_S, lambda: client.train_step(batch))
    assert isinstance(error, ServerNotAnsweringError) and "(waiting for a training step)" in str(error)
    assert took <= 2 + SLACK_S


def test_a_decode_step_to_a_frozen_server_ends_at_the_decode_deadline(frozen_able, tiny_tokenizer):
    address, proc = frozen_able
    timeouts = ClientTimeouts(decode_timeout_s=2, reconnect_timeout_s=0)
    with fedsea.SplitClient(address, packaged_split(), tokenizer=tiny_tokenizer, timeouts=timeouts) as client:
        pieces = client.stream("Hello there", max_new_tokens=20, eos_token_id=(), chat=False)
        next(pieces)  # the prefill and a first token: the stream is open and answered
        with frozen(proc):
            error, took = within(2 + 2 * SLACK_S, lambda: list(pieces))
    assert isinstance(error, ServerNotAnsweringError) and "(waiting for a decode step)" in str(error)
    assert took <= 2 + SLACK_S


def test_keepalive_notices_a_frozen_server_before_a_long_deadline(frozen_able, tiny_tokenizer):
    address, proc = frozen_able
    timeouts = ClientTimeouts(decode_timeout_s=120, reconnect_timeout_s=0)
    client = fedsea.SplitClient(address, packaged_split(), tokenizer=tiny_tokenizer, timeouts=timeouts)
    # Pings every second (the defaults: 20 s, and 10 s for the answer), so that the test is short.
    client.config = dataclasses.replace(client.config, keepalive_ms=1000, keepalive_timeout_ms=1000)
    with client:
        pieces = client.stream("Hello there", max_new_tokens=20, eos_token_id=(), chat=False)
        next(pieces)
        with frozen(proc):
            error, took = within(30, lambda: list(pieces))
    assert isinstance(error, ServerNotAnsweringError), error
    assert "(a decode step in flight, keepalive pings unanswered)" in str(error)
    assert took <= 2 + 2 * SLACK_S


def test_keepalive_ends_a_training_step_to_a_frozen_server_before_its_deadline(frozen_able, tiny_tokenizer):
    address, proc = frozen_able
    batch = fedsea.make_batch([tiny_tokenizer("A short text to train on.")["input_ids"]], tiny_tokenizer.pad_token_id)
    client = fedsea.SplitClient(address, packaged_split(), timeouts=ClientTimeouts(step_timeout_s=120))
    client.config = dataclasses.replace(client.config, keepalive_ms=1000, keepalive_timeout_ms=1000)
    with client:
        client.train_step(batch)
        with frozen(proc):
            error, took = within(30, lambda: client.train_step(batch))
    assert isinstance(error, ServerNotAnsweringError), error
    assert "(a training step in flight, keepalive pings unanswered)" in str(error)
    assert took <= 2 + 2 * SLACK_S


def test_the_round_wait_has_a_deadline(tmp_path, tiny_tokenizer):
    # The run waits for a second client that never comes: the first one's round wait must end.
    lora = fedsea.LoraSpec(r=4, dropout=0.0)
    config = FedConfig(rounds=1, local_steps=1, min_clients=2, expected_clients=2, join_timeout_s=120, lora=lora)
    server = TrunkServer(TrunkHost(fedsea.tiny_llama(**TINY)), rounds=coordinator_factory(config, tmp_path, False))
    split = fedsea.split_model(fedsea.tiny_llama(**TINY), 2, 1).add_lora(lora)
    examples = [encode_example(tiny_tokenizer, None, "A text.", 16)]
    with ServerThread(server) as port:
        timeouts = ClientTimeouts(round_timeout_s=1.5)
        with fedsea.SplitClient(f"127.0.0.1:{port}", split, timeouts=timeouts) as client:
            fed = FederatedClient(client, examples, 1, "c0")
            error, took = within(1.5 + 2 * SLACK_S, fed.run)
    assert isinstance(error, ServerNotAnsweringError) and "(waiting for the next round)" in str(error)
    assert "--round-timeout-s" in str(error) and took <= 1.5 + SLACK_S


def test_the_cli_reports_a_server_not_answering_and_exits_2(frozen_able, tmp_path):
    address, proc = frozen_able
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "The council approved a new park near the river."}\n')
    run = tmp_path / "run.toml"
    run.write_text('[model]\nsource = "tiny-llama"\n[federation]\nclients = 1\n[client]\nhead_layers = 1\n')
    common = ["--server", address, "--model", "tiny-llama", "--head-layers", "1", "--tail-layers", "1"]
    commands = {
        "train": ["train", *common, "--data", str(data), "--quiet", "--call-timeout-s", "3"],
        "generate": ["generate", *common, "--prompt", "Hi", "--sigma", "0", "--call-timeout-s", "3"],
        "chat": ["chat", *common, "--sigma", "0", "--call-timeout-s", "3"],
        "join": ["join", "--server", address, "--run", str(run), "--client", "client-0", "--data", str(data),
                 "--quiet", "--call-timeout-s", "3"],
    }  # fmt: skip
    with frozen(proc):
        runs = {
            name: subprocess.Popen(
                [*FEDSEA, *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=ENV,
            )
            for name, argv in commands.items()
        }
        outputs = {name: run.communicate(input="hello\n/quit\n", timeout=240) for name, run in runs.items()}
    for name, run in runs.items():
        stderr = outputs[name][1]
        assert run.returncode == 2, (name, stderr[-2000:])
        assert "Traceback" not in stderr, (name, stderr[-2000:])
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("fedsea: error: DEADLINE_EXCEEDED: server "), (name, last)
        assert f"server {address} not answering for 3 s" in last and "--call-timeout-s" in last, (name, last)


def test_join_raises_the_round_deadline_to_fit_the_run_unless_given():
    from fedsea.cli.generate import client_timeouts

    argv = ["generate", "--server", "x:1", "--prompt", "p"]
    assert client_timeouts(build_parser().parse_args(argv)) == ClientTimeouts()
    assert client_timeouts(build_parser().parse_args(argv), 5000.0).round_timeout_s == 5000.0
    given = build_parser().parse_args([*argv, "--round-timeout-s", "7", "--decode-timeout-s", "9"])
    assert client_timeouts(given, 5000.0) == ClientTimeouts(round_timeout_s=7, decode_timeout_s=9)
    with pytest.raises(ValueError, match="decode_timeout_s"):
        client_timeouts(build_parser().parse_args([*argv, "--decode-timeout-s", "0"]))
