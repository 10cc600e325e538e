"""The HTTP side of the OpenAI-compatible endpoint: FastAPI routes served by uvicorn.

Routes (OpenAI's): ``GET /v1/models`` and ``/v1/models/{id}``, ``POST /v1/chat/completions``
and ``POST /v1/completions``, streamed (server-sent events in OpenAI's chunk format, ending
with ``data: [DONE]``) or not. Every error is OpenAI's JSON error object with the matching
HTTP status (``fedsea.serving.protocol.ApiError``).

The generation runs in a worker thread (``SplitEngine.run``: torch and gRPC block) and reports
to the request's coroutine through an ``asyncio.Queue``. A streamed answer's HTTP status is
sent only once the trunk answered the prefill, so a trunk that cannot be reached is a 503 with
the client's diagnosis, not a 200 followed by an error event; an error after that is sent as
one ``data: {"error": ...}`` event (as vLLM does; the ``openai`` package raises it). A client
that disconnects sets the request's cancel flag (streamed: when the disconnect arrives, by
Starlette's listener; not streamed: polled every ``DISCONNECT_POLL_S``), and the generation
stops at its next step.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from fedsea.serving.engine import Answer, Cancelled, SplitEngine, api_error
from fedsea.serving.protocol import ApiError, CompletionRequest, Kind, chunk, completion, parse_request, sse, usage
from fedsea.serving.settings import EndpointSettings, key_matches

# How often a non-streamed request checks whether its client is still there, in seconds.
DISCONNECT_POLL_S = 0.25
# Seconds uvicorn waits for open requests at shutdown before cancelling them.
GRACEFUL_SHUTDOWN_S = 5


class _Gone(Exception):
    """The HTTP client disconnected before its answer."""


class _EventStream(StreamingResponse):
    """A ``StreamingResponse`` that sets the request's cancel flag however the response ends."""

    def __init__(self, content: AsyncIterator[bytes], cancel: threading.Event) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.cancel = cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            pass
        finally:
            self.cancel.set()


def _error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def create_app(engine: SplitEngine, model_name: str, settings: EndpointSettings, api_key: str | None) -> FastAPI:
    """The FastAPI application of the endpoint.

    Args:
        engine: answers the requests (started: connected to the trunk server).
        model_name: the model id served (requests naming another get a 404).
        settings: the request size limit and the queue (``EndpointSettings``).
        api_key: the key requests must present as ``Authorization: Bearer KEY`` (None: no key).
    """
    executor = ThreadPoolExecutor(max_workers=settings.max_queue + 1, thread_name_prefix="fedsea-openai")
    active: set[threading.Event] = set()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for cancel in list(active):  # stop the generations still running at shutdown
            cancel.set()
        executor.shutdown(wait=True)
        engine.close()

    app = FastAPI(
        title="fedsea OpenAI-compatible endpoint", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        what = "not found" if exc.status_code == 404 else str(exc.detail)
        message = (
            f"{request.method} {request.url.path}: {what} (fedsea serves /v1/models, /v1/chat/completions, "
            "/v1/completions)"
        )
        return _error_response(ApiError(exc.status_code, message, code=None))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(api_error(exc))  # a 500 in OpenAI's shape (uvicorn logs the traceback)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not key_matches(given.strip(), api_key):
            reason = "no API key given" if not header else "incorrect API key provided"
            raise ApiError(
                401, f"{reason}: send Authorization: Bearer KEY with this endpoint's key", code="invalid_api_key"
            )

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "fedsea"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        check_key(request)
        if model_id != model_name:
            raise _unknown_model(model_id, model_name)
        return model_card()

    async def read_body(request: Request) -> bytes:
        limit = settings.max_request_bytes
        too_large = ApiError(
            413, f"the request body is over {limit} bytes (max_request_bytes)", code="request_too_large"
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_large
            parts.append(part)
        return b"".join(parts)

    async def complete(request: Request, kind: Kind) -> Response:
        check_key(request)
        parsed = parse_request(await read_body(request), kind)
        if parsed.model != model_name:
            raise _unknown_model(parsed.model, model_name)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def emit(what: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (what, value))

        def work() -> None:
            try:  # a non-streamed answer needs no pieces: its coroutine only waits (and polls the client)
                emit("done", engine.run(parsed, cancel, emit if parsed.stream else None))
            except BaseException as exc:  # every failure reaches the request: none is lost in the thread
                emit("error", exc)
            finally:
                engine.release()
                active.discard(cancel)

        engine.admit()  # 429 when the queue is full
        active.add(cancel)
        try:
            executor.submit(work)
        except RuntimeError:  # shutting down
            engine.release()
            active.discard(cancel)
            raise ApiError(503, "the endpoint is shutting down", "server_error") from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        try:
            first = await _next_event(events, request, cancel, stream=parsed.stream)
        except _Gone:
            return Response(status_code=499)
        if first[0] == "error":
            raise api_error(first[1])
        if not parsed.stream:
            answer: Answer = first[1]
            counts = usage(answer.prompt_tokens, answer.completion_tokens)
            return JSONResponse(completion(parsed, rid, int(time.time()), answer.text, answer.finish_reason, counts))
        return _EventStream(_stream(parsed, rid, events, cancel), cancel)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, "text")

    return app


def _unknown_model(asked: str, served: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{asked}` does not exist: this endpoint serves `{served}`",
        param="model",
        code="model_not_found",
    )


async def _next_event(
    events: asyncio.Queue[tuple[str, Any]], request: Request, cancel: threading.Event, stream: bool
) -> tuple[str, Any]:
    """The first event that decides the HTTP status: ``start`` (streamed), ``done`` or ``error``;
    the client's disconnect meanwhile sets ``cancel`` and raises ``_Gone``."""
    while True:
        try:
            event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                cancel.set()
                raise _Gone from None
            continue
        if event[0] in ("done", "error") or (stream and event[0] == "start"):
            return event


async def _stream(
    request: CompletionRequest, rid: str, events: asyncio.Queue[tuple[str, Any]], cancel: threading.Event
) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed answer, after its ``start``."""
    created = int(time.time())
    try:
        if request.kind == "chat":
            yield sse(chunk(request, rid, created, "", first=True))
        while True:
            what, value = await events.get()
            if what == "piece" and value:
                yield sse(chunk(request, rid, created, value))
            elif what == "done":
                answer: Answer = value
                yield sse(
                    chunk(
                        request,
                        rid,
                        created,
                        None if request.kind == "chat" else "",
                        finish_reason=answer.finish_reason,
                    )
                )
                if request.include_usage:
                    counts = usage(answer.prompt_tokens, answer.completion_tokens)
                    yield sse(chunk(request, rid, created, counts=counts))
                yield sse("[DONE]")
                return
            elif what == "error":
                if not isinstance(value, Cancelled):
                    yield sse(api_error(value).body())
                    yield sse("[DONE]")
                return
    finally:
        cancel.set()  # a no-op after "done"; stops the generation when the client went away


# -- serving -----------------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def make_server(app: FastAPI) -> Any:
    """A uvicorn server of ``app`` (quiet, graceful shutdown capped at ``GRACEFUL_SHUTDOWN_S``)."""
    import uvicorn

    config = uvicorn.Config(
        app, log_level="warning", lifespan="on", ws="none", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
    )
    return uvicorn.Server(config)


class EndpointThread:
    """Serve an app in a background thread (tests, embedding in a program): on ``sock``, else on a
    new socket bound to ``host:port`` (port 0: a free one)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None) -> None:
        self.socket = sock if sock is not None else bind(host, port)
        self.port = int(self.socket.getsockname()[1])
        self.server = make_server(app)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self) -> str:
        """Start serving; returns the base URL (``http://host:port/v1``) once the server listens."""
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the endpoint did not start")
            time.sleep(0.01)
        host = self.socket.getsockname()[0]
        return f"http://{host}:{self.port}/v1"

    def stop(self) -> None:
        """Stop serving (open streams are cancelled after the graceful delay)."""
        self.server.should_exit = True
        self._thread.join(timeout=GRACEFUL_SHUTDOWN_S + 10)
        self.socket.close()


__all__ = ["EndpointThread", "bind", "create_app", "make_server"]
