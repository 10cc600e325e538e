"""OpenAI's request and response shapes for ``/v1/chat/completions`` and ``/v1/completions``.

Pure data, no model and no network: a request body (JSON bytes) becomes a checked
``CompletionRequest``, or an ``ApiError`` that carries the HTTP status and OpenAI's error
object (``{"error": {"message", "type", "param", "code"}}``), so that the ``openai`` package
raises the matching exception class (``BadRequestError`` for 400, ``AuthenticationError`` for
401, ``NotFoundError`` for 404, ...). Answers and stream chunks are built here too.

How OpenAI's sampling parameters map to fedsea's ``GenerationConfig``:

- ``temperature`` (0..2, default 1): 0 is greedy decoding (``do_sample=False``), token-identical
  to ``fedsea generate``; above 0, sampling at that temperature.
- ``top_p`` (0..1, default 1): nucleus sampling; 0 keeps only the likeliest token (greedy).
- ``max_completion_tokens`` (chat) or ``max_tokens``: ``max_new_tokens``. Not given: the room
  left in the context, at most the endpoint's default (``EndpointSettings.default_max_tokens``).
- ``stop`` (a string or up to 4): stop strings, cut from the answer as OpenAI does.
- ``seed``: the sampling generator's seed (reproducible sampling).
- ``n`` and ``best_of``: 1 only (one choice per request); ``presence_penalty`` and
  ``frequency_penalty``: 0 only; ``logprobs``, ``top_logprobs``, ``logit_bias``, tools,
  ``echo`` and ``suffix``: refused (fedsea does not compute them), each with a 400 naming it.
- Extensions, as vLLM names them: ``top_k`` (0: off), ``repetition_penalty`` (1: off) and
  ``ignore_eos`` (generate ``max_tokens`` tokens whatever the model says).

Unknown fields are ignored, as the ``openai`` package may send fields newer than this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from fedsea.errors import FedseaError

Kind = Literal["chat", "text"]
# OpenAI's documented ranges and limits.
MAX_TEMPERATURE = 2.0
MAX_STOP_SEQUENCES = 4
MAX_SEED = 2**63 - 1
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(FedseaError):
    """An error answered in OpenAI's shape.

    Args:
        status: the HTTP status (400 bad request, 401 bad key, 404 unknown model or route, 413
            body too large, 429 queue full, 503 trunk server unreachable, 500 a bug).
        message: one line saying what is wrong and what to do.
        type_: OpenAI's ``type`` (``invalid_request_error``, ``server_error``, ...).
        param: the request field at fault, if one is.
        code: OpenAI's ``code`` (``invalid_api_key``, ``model_not_found``,
            ``context_length_exceeded``, ...), if one applies.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 ``invalid_request_error``."""
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Sampling:
    """A request's sampling settings, checked (see the module for the mapping)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        """Temperature 0 or top_p 0: the likeliest token at every step."""
        return self.temperature == 0 or self.top_p == 0

    def generation_kwargs(self, max_new_tokens: int) -> dict[str, Any]:
        """Keyword arguments of ``fedsea.training.generation.GenerationConfig``."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": not self.greedy,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "stop": self.stop,
        }
        if not self.greedy:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


@dataclass(frozen=True)
class CompletionRequest:
    """A checked request of either endpoint.

    ``messages`` (chat): {"role", "content"} dicts with text content, roles as the chat template
    names them; ``prompt`` (completions): a text, or token ids.
    """

    kind: Kind
    model: str
    sampling: Sampling
    messages: tuple[dict[str, str], ...] = ()
    prompt: str | tuple[int, ...] = ""
    stream: bool = False
    include_usage: bool = False


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{name} must be a number, got {json.dumps(value)[:40]}", name)
    if not low <= value <= high:
        raise bad(f"{name} must be between {low:g} and {high:g}, got {value}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer, got {json.dumps(value)[:40]}", name)
    if value < low or (high is not None and value > high):
        raise bad(f"{name} must be an integer >= {low}" + (f" and <= {high}" if high is not None else ""), name)
    return value


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """400 for each parameter fedsea cannot honour, unless it has its no-op value."""
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise bad(f"{name}={body[name]!r}: fedsea's endpoint gives one choice per request (n=1)", name)
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad(f"{name} is not supported (only 0); repetition_penalty (> 1) discourages repeats", name)
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions"):
        if body.get(name) not in (None, False, {}, [], ""):
            raise bad(f"{name} is not supported by fedsea's endpoint", name)
    if body.get("tool_choice") not in (None, "none"):
        raise bad("tool_choice is not supported by fedsea's endpoint (no tools)", "tool_choice")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise bad('response_format: only {"type": "text"} is supported', "response_format")


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad(f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", "stop")
    return tuple(s for s in stops if s)


def _sampling(body: dict[str, Any], kind: Kind) -> Sampling:
    max_tokens = _integer(body, "max_tokens", 1)
    if kind == "chat":
        # The newer name wins (OpenAI deprecated max_tokens for chat).
        max_tokens = _integer(body, "max_completion_tokens", 1) or max_tokens
    seed = _integer(body, "seed", 0, MAX_SEED)
    top_k = _integer(body, "top_k", 0)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos must be true or false", "ignore_eos")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=top_k or 0,
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 1e-6, 100.0),
        seed=seed,
        stop=_stop(body),
        ignore_eos=ignore_eos,
    )


def _content(message: dict[str, Any], index: int) -> str:
    """A message's text: a string, or the text parts of a list (OpenAI's content parts)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"messages[{index}].content: only text parts are supported, got {kind!r}", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"messages[{index}].content must be a string or a list of text parts", "messages")


def _messages(body: dict[str, Any]) -> tuple[dict[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}] must be an object with role and content", "messages")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad(
                f"messages[{i}].role {role!r} is not supported (system, developer, user or assistant)", "messages"
            )
        out.append({"role": CHAT_ROLES[role], "content": _content(message, i)})
    return tuple(out)


def _prompt(body: dict[str, Any]) -> str | tuple[int, ...]:
    """A text, or token ids; a list of one of them is that one (one prompt per request)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return tuple(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad(f"fedsea's endpoint takes one prompt per request, got {len(prompt)}", "prompt")
    raise bad("prompt must be a string, a list of one string, or a list of token ids", "prompt")


def parse_request(raw: bytes, kind: Kind) -> CompletionRequest:
    """Check a request body of ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` (``text``).

    Raises:
        ApiError: 400 with the field at fault.
    """
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required (GET /v1/models lists the one served)", "model")
    _refuse_unsupported(body)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise bad("stream_options must be an object like {include_usage: true}", "stream_options")
        include_usage = bool(options.get("include_usage", False))
    sampling = _sampling(body, kind)
    if kind == "chat":
        return CompletionRequest(
            kind, model, sampling, messages=_messages(body), stream=stream, include_usage=include_usage
        )
    return CompletionRequest(kind, model, sampling, prompt=_prompt(body), stream=stream, include_usage=include_usage)


# -- answers --------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    request: CompletionRequest, rid: str, created: int, text: str, finish_reason: str, counts: dict[str, int]
) -> dict[str, Any]:
    """The answer to a non-streamed request (``chat.completion`` or ``text_completion``)."""
    if request.kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": request.model,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": counts,
    }


def chunk(
    request: CompletionRequest,
    rid: str,
    created: int,
    text: str | None = None,
    *,
    first: bool = False,
    finish_reason: str | None = None,
    counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One stream chunk: a text piece (``first``: with the assistant role), the end
    (``finish_reason``), or the usage chunk (``counts``: no choices, as OpenAI sends it)."""
    choices: list[dict[str, Any]] = []
    if counts is None:
        if request.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    out: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk" if request.kind == "chat" else "text_completion",
        "created": created,
        "model": request.model,
        "system_fingerprint": None,
        "choices": choices,
    }
    if request.include_usage:  # OpenAI: null on every chunk but the last, which carries it
        out["usage"] = counts
    return out


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` (or ``data: [DONE]``) and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


__all__ = ["ApiError", "CompletionRequest", "Sampling", "chunk", "completion", "parse_request", "sse", "usage"]
