"""OpenAI's request shapes checked and mapped to fedsea's generation settings; the endpoint's key
and loopback rules (``fedsea.serving.protocol`` and ``settings``: no model, no network)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedsea.serving.protocol import ApiError, chunk, parse_request
from fedsea.serving.settings import API_KEY_ENV, check_exposure, is_loopback, key_matches, read_api_key
from fedsea.training.generation import GenerationConfig

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def chat(**change):
    return parse_request(json.dumps({**CHAT, **change}).encode(), "chat")


def test_sampling_parameters_map_to_generation_config():
    greedy = chat(temperature=0, max_tokens=5, stop="##", seed=3).sampling.generation_kwargs(5)
    assert GenerationConfig(**greedy) == GenerationConfig(max_new_tokens=5, stop=("##",), seed=3)
    sampled = chat(temperature=0.7, top_p=0.9, top_k=40).sampling.generation_kwargs(8)
    assert GenerationConfig(**sampled) == GenerationConfig(
        max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9, top_k=40
    )
    assert chat(top_p=0).sampling.greedy  # only the likeliest token
    assert chat().sampling.temperature == 1.0 and not chat().sampling.greedy  # OpenAI's default samples
    assert chat(max_tokens=5, max_completion_tokens=9).sampling.max_tokens == 9
    assert chat(stop=["a", "b"]).sampling.stop == ("a", "b")


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"model": ""}, "model"),
    ],
)
def test_bad_requests_are_400_naming_the_field(change, param):
    with pytest.raises(ApiError) as caught:
        chat(**change)
    assert caught.value.status == 400 and caught.value.param == param
    assert set(caught.value.body()["error"]) == {"message", "type", "param", "code"}


def test_messages_and_prompts_are_normalized():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    request = chat(messages=[{"role": "developer", "content": "sys"}, {"role": "user", "content": parts}])
    assert request.messages == ({"role": "system", "content": "sys"}, {"role": "user", "content": "ab"})
    text = parse_request(b'{"model": "m", "prompt": ["once"]}', "text")
    assert text.prompt == "once"
    assert parse_request(b'{"model": "m", "prompt": [5, 6]}', "text").prompt == (5, 6)
    with pytest.raises(ApiError, match="one prompt per request"):
        parse_request(b'{"model": "m", "prompt": ["a", "b"]}', "text")
    with pytest.raises(ApiError, match="not valid JSON"):
        parse_request(b"{", "chat")


def test_usage_is_null_on_every_chunk_but_the_last_when_asked():
    asked = chat(stream=True, stream_options={"include_usage": True})
    assert chunk(asked, "id", 0, "x")["usage"] is None
    last = chunk(asked, "id", 0, counts={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 3
    assert "usage" not in chunk(chat(stream=True), "id", 0, "x")


def test_loopback_only_without_a_key(tmp_path, monkeypatch):
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.0.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.4", "::", "example.org"))
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", "key")
    with pytest.raises(ValueError, match="set an API key"):
        check_exposure("0.0.0.0", None)
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert read_api_key(None) is None
    monkeypatch.setenv(API_KEY_ENV, " env-key\n")
    assert read_api_key(None) == "env-key"
    (tmp_path / "key").write_text("file-key\n")
    assert read_api_key(tmp_path / "key") == "file-key"  # the file wins over the environment
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_api_key(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        read_api_key(tmp_path / "missing")
    assert key_matches("k1", "k1") and not key_matches("k2", "k1") and not key_matches(None, "k1")


def test_the_cli_parser_imports_no_web_framework():
    """``fedsea openai`` loads FastAPI and uvicorn in its function only: ``--help`` stays light."""
    code = (
        "import sys; from fedsea.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'fedsea.serving.engine') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]
