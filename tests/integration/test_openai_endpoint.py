"""``fedsea openai`` (issue 17 item 3): an OpenAI-compatible endpoint on the client's machine,
generating through the split. A real trunk server on loopback, the endpoint as a real ``fedsea
openai`` process (and in a thread where the test must stop the trunk), talked to with the real
``openai`` package, httpx and curl. Greedy answers are token-identical to fedsea's own split
generation (``SplitClient.generate_ids`` / ``stream``, what ``fedsea generate`` and ``chat`` call)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

import fedsea
from fedsea.cli.main import build_parser, main
from fedsea.client.prompts import encode_prompts
from fedsea.client.split_client import SplitClient
from fedsea.config import NoiseConfig
from fedsea.model.load import load_model, load_tokenizer
from fedsea.model.split import split_model
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.trunk import TrunkHost
from tests.conftest import randomize_lora

FEDSEA = [sys.executable, "-m", "fedsea.cli"]
KEY = "test-key-8f2c"
MODEL = "tiny-llama"
PROMPT = "Patient 3 was admitted with"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How is patient 3?"}]
N = 12  # new tokens


def _trunk(port: int = 0) -> tuple[str, ServerThread, TrunkServer]:
    server = TrunkServer(TrunkHost(load_model(MODEL, "float32", "cpu")), port=port)
    thread = ServerThread(server)
    return f"localhost:{thread.start()}", thread, server


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Saved random adapters at (p, q) = (1, 1), a trunk server, ``fedsea openai`` on them (API key
    from the environment) and, in this process, the same split as a library ``SplitClient``."""
    folder = tmp_path_factory.mktemp("openai")
    split = split_model(load_model(MODEL, "float32", "cpu"), 1, 1).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=3)
    split.save_adapters(folder / "adapters")
    address, thread, server = _trunk()
    env = {**os.environ, "FEDSEA_OPENAI_API_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    argv = [*FEDSEA, "openai", "--server", address, "--model", MODEL, "--adapters", str(folder / "adapters"),
            "--sigma", "0", "--wire-dtype", "fp32", "--port", "0"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tokenizer = load_tokenizer(MODEL)
    reference = split_model(load_model(MODEL, "float32", "cpu"), 1, 1)
    reference.load_adapters(folder / "adapters")  # what fedsea generate/chat --adapters do
    client = SplitClient(address, reference, noise=NoiseConfig(sigma=0.0), wire_dtype="fp32", tokenizer=tokenizer)
    try:
        line = proc.stdout.readline()  # "fedsea openai: serving `tiny-llama` at http://127.0.0.1:PORT/v1 ..."
        assert " at http://" in line, proc.stderr.read() if proc.poll() is not None else line
        url = line.split(" at ", 1)[1].split()[0]
        with client:
            yield SimpleNamespace(url=url, client=client, tokenizer=tokenizer, trunk=server, split=reference,
                                  api=openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60))  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        thread.stop()


def _reference(s, prompt, chat: bool, **options) -> tuple[list[int], str, int]:
    """fedsea's own split generation: (new token ids, text, prompt tokens)."""
    ids, lengths = encode_prompts(s.tokenizer, s.split, prompt, chat)
    out = s.client.generate_ids(ids, lengths, max_new_tokens=N, **options)
    return out.token_ids[0], out.texts[0], int(ids.shape[1])


def _finish(s, tokens: list[int]) -> str:
    return "length" if len(tokens) == N and tokens[-1] != s.tokenizer.eos_token_id else "stop"


def test_completions_streamed_or_not_are_fedsea_s_greedy_split_generation(setup):
    s = setup
    tokens, text, prompt_tokens = _reference(s, PROMPT, chat=False)
    assert s.client.generate([PROMPT], chat=False, max_new_tokens=N) == [text]  # what fedsea generate prints
    answer = s.api.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=N)
    assert answer.choices[0].text == text and answer.object == "text_completion"
    assert answer.choices[0].finish_reason == _finish(s, tokens)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, len(tokens))

    chunks = list(s.api.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=N, stream=True,
                                           stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == _finish(s, tokens)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    assert all(c.usage is None for c in chunks[:-1])

    # a stop string cuts the answer before it, streamed or not
    stop = text[4:7]
    cut = text[: text.find(stop)]
    answer = s.api.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=N, stop=[stop])
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (cut, "stop")
    streamed = s.api.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=N, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut

    # sampling: temperature and seed mapped to fedsea's, reproducible
    sampled, sampled_text, _ = _reference(s, PROMPT, chat=False, do_sample=True, temperature=0.8, seed=7)
    answer = s.api.completions.create(model=MODEL, prompt=PROMPT, temperature=0.8, seed=7, max_tokens=N)
    assert answer.choices[0].text == sampled_text and answer.usage.completion_tokens == len(sampled)
    assert sampled_text != text


def test_chat_streamed_or_not_is_fedsea_chat_s_answer(setup):
    s = setup
    tokens, text, prompt_tokens = _reference(s, MESSAGES, chat=True)
    assert "".join(s.client.stream(MESSAGES, max_new_tokens=N)) == text  # what fedsea chat prints
    answer = s.api.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_completion_tokens=N)
    assert answer.choices[0].message.content == text and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == _finish(s, tokens)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, len(tokens))

    chunks = list(s.api.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=N,
                                                stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-2].choices[0].finish_reason == _finish(s, tokens)
    assert chunks[-1].usage.prompt_tokens == prompt_tokens and chunks[-1].usage.completion_tokens == len(tokens)

    # concurrent requests queue for the one split session: each gets its own, identical, answer
    answers: list[str] = []

    def ask() -> None:
        reply = s.api.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=N)
        answers.append(reply.choices[0].message.content)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert answers == [text] * 3


def test_bad_requests_get_openai_s_error_shape(setup):
    s = setup
    messages = [{"role": "user", "content": "hi"}]
    cases = [
        ({"n": 2}, openai.BadRequestError, "n", None),
        ({"model": "gpt-4o"}, openai.NotFoundError, "model", "model_not_found"),
        ({"temperature": 3}, openai.BadRequestError, "temperature", None),
        ({"presence_penalty": 0.5}, openai.BadRequestError, "presence_penalty", None),
        ({"logprobs": True}, openai.BadRequestError, "logprobs", None),
        ({"messages": [{"role": "tool", "content": "x"}]}, openai.BadRequestError, "messages", None),
    ]
    for change, error, param, code in cases:
        with pytest.raises(error) as caught:
            s.api.chat.completions.create(**{"model": MODEL, "messages": messages, "max_tokens": 2, **change})
        body = caught.value.body
        assert set(body) == {"message", "type", "param", "code"}, body
        assert (body["param"], body["code"]) == (param, code) and body["message"], body
    with pytest.raises(openai.BadRequestError, match="one prompt per request"):
        s.api.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2)
    # not JSON, and an unknown route: the same shape
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    reply = httpx.post(f"{s.url}/chat/completions", content=b"{not json", headers=headers)
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    reply = httpx.get(f"{s.url}/engines", headers=headers)
    assert reply.status_code == 404 and "message" in reply.json()["error"]
    assert [m.id for m in s.api.models.list()] == [MODEL]


def test_requests_over_the_length_limits_are_refused(setup):
    s = setup
    long_prompt = " ".join(f"w{i}" for i in range(3000))  # > 2048 tokens, tiny-llama's context
    with pytest.raises(openai.BadRequestError) as caught:
        s.api.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)
    assert caught.value.body["code"] == "context_length_exceeded" and "2048" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:  # a short prompt but too long an answer
        s.api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4000)
    assert (caught.value.body["code"], caught.value.body["param"]) == ("context_length_exceeded", "max_tokens")
    with pytest.raises(openai.APIStatusError) as caught:  # over max_request_bytes (4 MiB)
        s.api.completions.create(model=MODEL, prompt="x" * (5 * 1024 * 1024), max_tokens=4)
    assert caught.value.status_code == 413 and caught.value.body["code"] == "request_too_large"


def test_a_wrong_or_missing_api_key_is_401(setup):
    s = setup
    wrong = openai.OpenAI(base_url=s.url, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(f"{s.url}/models").status_code == 401


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
def test_curl_streams_server_sent_events(setup):
    s = setup
    _, text, _ = _reference(s, MESSAGES, chat=True)
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": N, "stream": True})
    curl = ["curl", "-sS", "-N", "--max-time", "60", "-H", f"Authorization: Bearer {KEY}",
            "-H", "Content-Type: application/json"]  # fmt: skip
    out = subprocess.run([*curl, "-d", body, f"{s.url}/chat/completions"], capture_output=True, text=True, timeout=90)
    events = [line.removeprefix("data: ") for line in out.stdout.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", out.stdout[-500:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text
    # an error, not streamed: OpenAI's JSON error object and status 400
    bad = json.dumps({"model": MODEL, "messages": MESSAGES, "n": 3})
    out = subprocess.run([*curl, "-w", "\n%{http_code}", "-d", bad, f"{s.url}/chat/completions"],
                         capture_output=True, text=True, timeout=90)  # fmt: skip
    payload, status = out.stdout.rsplit("\n", 1)
    assert status == "400" and json.loads(payload)["error"]["param"] == "n"


def test_a_client_that_disconnects_stops_the_generation(setup):
    s = setup
    streams = s.trunk.servicer.generation
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}  # ~10 s
    with httpx.stream("POST", f"{s.url}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break
        assert streams.count() == 1  # generating
    end = time.monotonic() + 5
    while streams.count() and time.monotonic() < end:
        time.sleep(0.05)
    assert streams.count() == 0  # the inference stream closed long before its 1500 tokens
    start = time.monotonic()  # and the session is free for the next request at once
    s.api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert time.monotonic() - start < 5

    # not streamed: a client that gives up (here a 1 s timeout) stops its generation too
    impatient = openai.OpenAI(base_url=s.url, api_key=KEY, max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1500, extra_body={"ignore_eos": True})
    end = time.monotonic() + 3
    while streams.count() and time.monotonic() < end:
        time.sleep(0.05)
    assert streams.count() == 0


def test_an_unreachable_trunk_is_503_with_the_diagnosis(setup, tmp_path, monkeypatch, caplog):
    """The endpoint in this process (``open_endpoint``, what the command runs); the trunk then stops."""
    from fedsea.cli.openai_cmd import open_endpoint
    from fedsea.serving.app import EndpointThread

    monkeypatch.delenv("FEDSEA_OPENAI_API_KEY", raising=False)
    address, thread, _ = _trunk()
    adapters = tmp_path / "adapters"
    setup.split.save_adapters(adapters)
    args = build_parser().parse_args(["openai", "--server", address, "--model", MODEL, "--adapters", str(adapters),
                                      "--sigma", "0", "--port", "0", "--reconnect-timeout-s", "0"])  # fmt: skip
    endpoint = open_endpoint(args)
    served = EndpointThread(endpoint.app, sock=endpoint.sock)
    api = openai.OpenAI(base_url=served.start(), api_key="none", max_retries=0, timeout=60)
    port = int(address.rsplit(":", 1)[1])
    try:
        assert api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
        # the trunk server restarts between two requests: it forgot the session (NOT_FOUND), so the
        # endpoint opens a new one and answers
        thread.stop()
        thread = _trunk(port)[1]
        assert api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
        assert "no longer knows this session" in caplog.text
        thread.stop()
        for stream in (False, True):  # the stream's failure, then the reconnection's: both diagnosed
            with pytest.raises(openai.InternalServerError) as caught:
                api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, stream=stream)
            assert caught.value.status_code == 503
            assert f"nothing is listening at {address}" in caught.value.body["message"], caught.value.body
        thread = _trunk(port)[1]  # back: the next request reconnects
        assert api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
    finally:
        served.stop()
        thread.stop()


def test_a_non_loopback_host_needs_an_api_key(monkeypatch, capsys):
    monkeypatch.delenv("FEDSEA_OPENAI_API_KEY", raising=False)
    assert main(["openai", "--server", "localhost:1", "--host", "0.0.0.0"]) == 2
    assert "set an API key first" in capsys.readouterr().err


def test_speculative_decoding_answers_as_plain_generation_with_fewer_round_trips(tmp_path):
    """``fedsea openai --speculative prompt-lookup``: the engine's answers are plain greedy split
    generation's tokens, in fewer round trips to the trunk (a prompt that repeats itself)."""
    import threading

    from fedsea.serving.engine import SplitEngine
    from fedsea.serving.protocol import parse_request

    address, thread, _ = _trunk()
    tokenizer = load_tokenizer(MODEL)
    prompt = "one two three four five six one two three four five six one two three four five six one two"
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0}).encode()
    answers, trips = {}, {}
    try:
        for name, drafter in (("plain", None), ("speculative", "prompt-lookup")):
            split = split_model(load_model(MODEL, "float32", "cpu"), 1, 1).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
            randomize_lora(split.model, seed=3)
            client = SplitClient(address, split, noise=NoiseConfig(sigma=0.0), wire_dtype="fp32", tokenizer=tokenizer)
            engine = SplitEngine(client, speculative=drafter, num_draft_tokens=4).start()
            try:
                assert client.connection is not None
                before = client.connection.meter.rpc("generate").calls  # one per step: a round trip each
                answers[name] = engine.run(parse_request(body, "completion"), threading.Event())
                trips[name] = client.connection.meter.rpc("generate").calls - before
            finally:
                engine.close()
    finally:
        thread.stop()
    assert answers["speculative"] == answers["plain"] and answers["plain"].completion_tokens == 12
    assert trips["speculative"] < trips["plain"], trips
