"""How a servicer RPC is called: who the caller is, and how any error becomes a status.

``unary`` and ``streaming`` wrap an RPC body ``(self, client, request(s), context)``: the
caller is identified first (``identify``), and every exception ends the RPC through the
servicer's ``_fail`` (``abort_with``): a status from the one table in ``fedsea.errors``, a
detail capped in length, one rate-limited log line (``RefusalLog``), and a traceback only for
an internal fault (an exception no table entry maps).

Identity: a token's client id, else the client certificate's common name, else
``anonymous``. Everyone holding one client certificate (with no tokens) is one identity.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc

from fedsea.errors import cap_detail, status_code_name
from fedsea.server.handlers import CLIENT, RPC
from fedsea.server.refusals import RefusalLog
from fedsea.wire.auth import TokenStore, bearer

# The identity of every caller of a server without client authentication (no tokens, no client CA).
ANONYMOUS = "anonymous"
# Longest client name a log line shows (a certificate's common name is the client's text).
MAX_NAME_CHARS = 80
Context = grpc.aio.ServicerContext[Any, Any]


class Servicer(Protocol):
    """What the wrappers need of a servicer."""

    def _client(self, context: Context) -> str: ...

    async def _fail(self, context: Context, exc: BaseException) -> None: ...


def unary(rpc: Callable[[Any, str, Any, Context], Awaitable[Any]]) -> Callable[[Any, Any, Context], Awaitable[Any]]:
    """A unary RPC body ``(self, client, request, context)``: the caller authenticated, every error a status."""

    @functools.wraps(rpc)
    async def handler(self: Servicer, request: Any, context: Context) -> Any:
        try:
            return await rpc(self, self._client(context), request, context)
        except Exception as exc:
            await self._fail(context, exc)

    return handler


def streaming(rpc: Callable[[Any, str, Any, Context], AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """A response-streaming RPC body ``(self, client, request(s), context)``, wrapped like ``unary``."""

    @functools.wraps(rpc)
    async def handler(self: Servicer, request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            async for message in rpc(self, self._client(context), request, context):
                yield message
        except Exception as exc:
            await self._fail(context, exc)

    return handler


def identify(tokens: TokenStore | None, context: Context) -> str:
    """The caller's identity: its token's client id, else its mTLS certificate's common name, else ``anonymous``.

    Raises:
        AuthenticationError: (UNAUTHENTICATED) a missing or unknown token when ``tokens`` is set.
    """
    if tokens is not None:
        metadata = context.invocation_metadata()
        client = tokens.authenticate(bearer(tuple(metadata) if metadata is not None else None))
    else:
        names = list(context.auth_context().get("x509_common_name") or [])
        client = names[0].decode(errors="replace") if names else ANONYMOUS
    CLIENT.set(client)  # for the refusal log of this RPC
    return client


def sees_server(tokens: TokenStore | None, client: str, context: Context) -> bool:
    """Whether ``client`` may see server-wide figures: an operator token, or a caller of a server with
    no client authentication at all (every caller is then the one ``anonymous`` identity)."""
    if tokens is not None:
        return tokens.is_operator(client)
    return client == ANONYMOUS and not context.peer_identities()


async def abort_with(refusals: RefusalLog, context: Context, exc: BaseException) -> None:
    """Abort the RPC with ``exc``'s status (``fedsea.errors.STATUS_CODES``); log it, rate-limited.

    A refusal is one log line (``RefusalLog``: at most ``burst`` per code and RPC per window, the
    rest counted) and its detail is capped (``cap_detail``): it never echoes unbounded client
    input. Only an internal fault (an unmapped exception) logs a traceback, and its status names
    only the exception's class.
    """
    code, rpc = status_code_name(exc), RPC.get()
    who = cap_detail(CLIENT.get() or context.peer(), MAX_NAME_CHARS)
    if code == "INTERNAL":
        detail = f"internal error: {type(exc).__name__}"
        refusals.refused(code, rpc, who, detail, exc_info=exc)
    else:
        detail = cap_detail(str(exc))
        refusals.refused(code, rpc, who, detail)
    forget_frames(exc)
    await context.abort(grpc.StatusCode[code], detail)


def forget_frames(exc: BaseException) -> None:
    """Drop the tracebacks of ``exc`` and the exceptions it chains, once it has been logged.

    grpc keeps the ``AbortError`` of an aborted call (its ``__context__`` is ``exc``) in the
    call's state after the call ends; through the tracebacks it would keep every frame the
    error passed, with their locals: a refused forward's frame holds the session's pending
    step, i.e. a whole graph of activations (hundreds of MB), until grpc lets go of the state.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        err.__traceback__ = None
        todo += [err.__cause__, err.__context__]
