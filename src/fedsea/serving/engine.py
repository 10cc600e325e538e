"""``SplitEngine``: OpenAI requests answered by split generation through one ``SplitClient``.

The text never leaves this machine: the prompt is tokenized here, the head runs here, and only
its hidden states (noised as the client's ``NoiseConfig`` says) go to the trunk server; the
tail and the sampling run here too. The loop is fedsea's own (``generate_steps``, the one
behind ``SplitClient.generate`` and ``stream``), so a greedy answer is token-identical to
``fedsea generate`` / ``fedsea chat`` for the same prompt.

Concurrency: one lock, one session. A ``SplitClient`` holds one training session on the trunk
server (its trunk adapter uploaded once) and this engine runs one generation on it at a time;
concurrent requests wait in line (at most ``max_queue``, then 429). A pool of sessions would
run several answers at once, but each session costs the server a copy of the trunk adapter and
its own share of the per-client stream and cache limits, and on this machine the head and
tail steps of parallel answers would compete for the same cores; one session keeps the
server's view of this client simple and each answer's latency predictable. The lock is fair
enough for a personal endpoint (first come, mostly first served; not strictly FIFO).

Cancellation: every request carries a ``threading.Event``; the generation checks it between
steps (and while waiting in line) and stops, closing its inference stream so the server frees
the KV cache at once. The web layer sets it when the HTTP client disconnects.

Session upkeep: the server closes a session idle for ``idle_timeout_s`` (its limits, 600 s by
default), so an engine idle for half of that opens a fresh one before the next answer. A
failure of the trunk (unreachable, restarted, refused) marks the session stale: the next
request reconnects. A session the server no longer knows (NOT_FOUND: the server restarted
between two requests) is reopened and the request retried once, before any token was produced
(the retry is a new generation with a fresh noise draw, as if the user had resent the request; the
refused stream's prefill reached a server that had no session to run it in). A trunk lost in
the middle of an answer is waited for, as by ``fedsea chat``, for up to
``ClientTimeouts.reconnect_timeout_s`` (``--reconnect-timeout-s``, 120 s), the answer then
going on token-identically; past that, or with 0, the request fails with a 503.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedsea.client.diagnose import explain
from fedsea.client.prompts import encode_prompts
from fedsea.client.split_client import SplitClient
from fedsea.errors import FedseaError, InvalidInputError, RemoteError
from fedsea.model.split import check_token_ids
from fedsea.serving.protocol import ApiError, CompletionRequest, bad
from fedsea.training.generation import GenerationConfig, generate_steps
from fedsea.training.generation_config import first_stop

# /v1/completions' default answer length when a request sets none (OpenAI's and vLLM's).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# How often a request waiting in line looks at its cancel flag, in seconds.
WAIT_POLL_S = 0.1

Emit = Callable[[str, Any], None]
log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The request's client went away; the generation stopped."""


@dataclass(frozen=True)
class Answer:
    """A finished generation: the text (cut before a stop string), why it ended (``stop`` or
    ``length``, OpenAI's names) and the token counts of OpenAI's ``usage``."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class SplitEngine:
    """Answer ``CompletionRequest``s through a ``SplitClient``, one generation at a time.

    Args:
        client: the split client (head and tail here, adapters loaded, a tokenizer set); the
            engine connects it (``start``) and closes it (``close``).
        max_model_len: longest prompt plus answer in tokens (None: the model's
            ``max_position_embeddings`` and the server's ``max_seq_len``, the smaller).
        default_max_tokens: a chat answer's length when the request sets none (at most the
            room left in the context).
        max_queue: requests that may wait while one generates; one more is refused (429).
        speculative: every answer's drafter for speculative decoding (``GenerationConfig.speculative``:
            ``"prompt-lookup"`` or a draft model source); None generates one token per round trip.
        num_draft_tokens: with ``speculative``, the most draft tokens per round trip (None: the drafter's default).
    """

    def __init__(
        self,
        client: SplitClient,
        max_model_len: int | None = None,
        default_max_tokens: int = 512,
        max_queue: int = 32,
        speculative: object = None,
        num_draft_tokens: int | None = None,
    ) -> None:
        if client.tokenizer is None:
            raise ValueError("the endpoint needs a tokenizer: SplitClient(..., tokenizer=...)")
        self.client = client
        self.tokenizer = client.tokenizer
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens
        self.max_queue = max_queue
        # Every request's speculative decoding (``GenerationConfig.speculative``): None, or the drafter.
        self.speculative = {"speculative": speculative, "num_draft_tokens": num_draft_tokens} if speculative else {}
        self._lock = threading.Lock()  # one generation at a time on the one session
        self._count_lock = threading.Lock()
        self._admitted = 0  # requests generating or waiting for the lock
        self._stale = False
        self._last_used = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> SplitEngine:
        """Connect: open the session and upload the trunk adapter (errors name the likely cause)."""
        self.client.connect()
        self._last_used = time.monotonic()
        return self

    def close(self) -> None:
        """Close the session and the channel."""
        self.client.close()

    @property
    def context_limit(self) -> int:
        """Longest prompt plus answer, in tokens."""
        limits = [int(getattr(self.client.split.model.config, "max_position_embeddings", 0) or 0)]
        info = self.client.session_info
        if info is not None and info.limits.max_seq_len:
            limits.append(int(info.limits.max_seq_len))
        if self.max_model_len is not None:
            limits.append(self.max_model_len)
        return min(v for v in limits if v > 0)

    # -- admission -------------------------------------------------------------------------------
    def admit(self) -> None:
        """Count a request in, or refuse it (429) when ``max_queue`` already wait; ``release`` after."""
        with self._count_lock:
            if self._admitted > self.max_queue:
                raise ApiError(
                    429,
                    f"{self._admitted - 1} requests are already waiting for this endpoint's split session "
                    f"(max_queue={self.max_queue}): retry later",
                    "requests",
                    code="rate_limit_exceeded",
                )
            self._admitted += 1

    def release(self) -> None:
        """Count a request out (its generation ended, or never started)."""
        with self._count_lock:
            self._admitted -= 1

    # -- one request -----------------------------------------------------------------------------
    def encode(self, request: CompletionRequest) -> torch.Tensor:
        """The prompt's token ids (1, n): chat messages through the chat template, a text as is."""
        split = self.client.split
        try:
            if request.kind == "chat":
                if getattr(self.tokenizer, "chat_template", None) is None:
                    raise bad("this model's tokenizer has no chat template: use /v1/completions", "messages")
                ids, _ = encode_prompts(self.tokenizer, split, list(request.messages), chat=True)
            elif isinstance(request.prompt, str):
                ids, _ = encode_prompts(self.tokenizer, split, request.prompt, chat=False)
            else:
                ids = torch.tensor([list(request.prompt)], dtype=torch.int64)
                check_token_ids(ids, split.head.embed_tokens.num_embeddings)
                ids = ids.to(split.model.device)
        except ApiError:
            raise
        except (InvalidInputError, ValueError) as exc:
            raise bad(f"cannot encode the prompt: {exc}", "messages" if request.kind == "chat" else "prompt") from None
        except Exception as exc:  # a chat template that refuses the conversation (jinja's TemplateError)
            raise bad(f"the chat template refused the messages: {exc}", "messages") from None
        if ids.shape[1] == 0:
            raise bad("the prompt is empty (no tokens)", "prompt")
        return ids

    def config(self, request: CompletionRequest, prompt_tokens: int) -> GenerationConfig:
        """The ``GenerationConfig`` of a request, within the context limit (400 otherwise)."""
        limit = self.context_limit
        param = "messages" if request.kind == "chat" else "prompt"
        asked = request.sampling.max_tokens
        if prompt_tokens >= limit or (asked is not None and prompt_tokens + asked > limit):
            wanted = (
                f"{prompt_tokens + (asked or 1)} tokens ({prompt_tokens} in the prompt, {asked or 1} for the answer)"
            )
            raise bad(
                f"This model's maximum context length is {limit} tokens. However, you requested {wanted}. "
                "Please reduce the length of the prompt or of max_tokens.",
                param if prompt_tokens >= limit else "max_tokens",
                code="context_length_exceeded",
            )
        default = self.default_max_tokens if request.kind == "chat" else COMPLETIONS_DEFAULT_MAX_TOKENS
        max_new = asked if asked is not None else min(default, limit - prompt_tokens)
        eos = self.tokenizer.eos_token_id
        eos_ids: tuple[int, ...] = () if request.sampling.ignore_eos or eos is None else (int(eos),)
        try:
            kwargs = {**request.sampling.generation_kwargs(max_new), **self.speculative}
            return GenerationConfig(**kwargs, eos_token_id=eos_ids)
        except ValueError as exc:
            raise bad(str(exc)) from None

    def run(self, request: CompletionRequest, cancel: threading.Event, emit: Emit | None = None) -> Answer:
        """Generate the answer to ``request`` (blocking; call it from a worker thread).

        ``emit(kind, value)`` hears ``("start", prompt_tokens)`` once the trunk answered the
        prefill, then ``("piece", text)`` for each new piece of text (a possible stop-string
        prefix or half a UTF-8 character is held back until resolved).

        Raises:
            ApiError: a bad request (400), the trunk server unreachable or refusing (503).
            Cancelled: ``cancel`` was set.
        """
        emit = emit or (lambda kind, value: None)
        ids = self.encode(request)
        config = self.config(request, int(ids.shape[1]))
        while not self._lock.acquire(timeout=WAIT_POLL_S):
            if cancel.is_set():
                raise Cancelled
        try:
            for attempt in (0, 1):
                started = threading.Event()

                def relay(kind: str, value: Any, started: threading.Event = started) -> None:
                    if kind == "start":
                        started.set()
                    emit(kind, value)

                try:
                    self._refresh_session()
                    return self._generate(ids, config, cancel, relay)
                except RemoteError as err:
                    self._stale = True  # the next request reconnects
                    if err.code == "NOT_FOUND" and attempt == 0 and not started.is_set():
                        # the server forgot the session (restarted): a new one, once
                        log.warning("the trunk server no longer knows this session (restarted?): opening a new one")
                        continue
                    raise self._unavailable(err) from None
            raise AssertionError("unreachable")
        finally:
            self._last_used = time.monotonic()
            self._lock.release()

    def _refresh_session(self) -> None:
        """Reconnect when the session is stale, or idle long enough that the server may have reaped it."""
        info = self.client.session_info
        idle_limit = float(info.limits.idle_timeout_s) if info is not None and info.limits.idle_timeout_s else 0.0
        idle = time.monotonic() - self._last_used
        if self._stale or self.client.connection is None or (idle_limit and idle > idle_limit / 2):
            why = "after a failure" if self._stale else f"after {idle:.0f} s idle"
            log.info("reconnecting to the trunk server %s (%s)", self.client.config.address, why)
            self.client.close()
            self.client.connect()
            self._stale = False

    def _unavailable(self, err: RemoteError) -> ApiError:
        """503 with the client's one-line diagnosis of a trunk failure (``fedsea.client.diagnose``)."""
        config = self.client.config
        message = err.message
        if "(gRPC: " not in message:  # not yet diagnosed (a failure inside a generation stream)
            message = explain(err.code, message, config.address, config.tls, config.token is not None)
        return ApiError(
            503,
            f"the trunk server {config.address} failed ({err.code}): {message}",
            "server_error",
            code="trunk_unavailable",
        )

    @torch.no_grad()
    def _generate(self, ids: torch.Tensor, config: GenerationConfig, cancel: threading.Event, emit: Emit) -> Answer:
        """fedsea's generation loop over a new inference stream, text pieces as ``_stream_pieces`` makes them."""
        client = self.client
        n = int(ids.shape[1])
        lengths = torch.tensor([n], device=ids.device)  # (1,): one prompt, no padding
        stepper = client.stepper(n + config.max_new_tokens, config.use_cache)
        decode = self._decode
        # The session's noise, fresh for this generation, as SplitClient.generate and stream draw it.
        privatize = client._inference_privatizer()
        steps = generate_steps(client.split, stepper, ids, lengths, config, decode, privatize)
        tokens: list[int] = []
        shown = 0
        text = ""
        finish: str | None = None
        hold = max((len(s) for s in config.stop), default=1) - 1  # chars that might start a stop string
        try:
            for step in steps:
                if not tokens:
                    emit("start", n)
                tokens.extend(step.tokens.values())
                text = decode(tokens)
                cut = first_stop(text, config.stop) if config.stop else -1
                if cut >= 0:
                    finish, text = "stop", text[:cut]
                    if cut > shown:
                        emit("piece", text[shown:])
                    break
                safe = len(text) - hold if config.stop else len(text)
                if text.endswith("\ufffd"):
                    safe = min(safe, len(text) - 1)
                if safe > shown:
                    emit("piece", text[shown:safe])
                    shown = safe
                if cancel.is_set():
                    raise Cancelled
        finally:
            steps.close()  # type: ignore[attr-defined]  # a generator
            stepper.close()  # the server frees the stream's KV cache now
        if finish is None:
            eos = set(config.eos_token_id or ())
            finish = "length" if len(tokens) >= config.max_new_tokens and tokens[-1] not in eos else "stop"
            if len(text) > shown:
                emit("piece", text[shown:])
        return Answer(text, finish, n, len(tokens))

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def api_error(exc: BaseException) -> ApiError:
    """The OpenAI-shaped error of any failure of a request (500 for the unexpected)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (InvalidInputError, ValueError)):
        return bad(str(exc))
    if isinstance(exc, FedseaError):
        return ApiError(500, f"{type(exc).__name__}: {exc}", "server_error")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


__all__ = ["COMPLETIONS_DEFAULT_MAX_TOKENS", "Answer", "Cancelled", "SplitEngine", "api_error"]
