"""Registering the Trunk service with requests parsed by fedsea, not by grpc.

The generated ``add_TrunkServicer_to_server`` gives grpc each request type's ``FromString``:
an undecodable message then fails inside grpc, before any fedsea code runs, as INTERNAL or
UNKNOWN with a traceback in the log per request (issue 14: 25,872 of 120,000 fuzzed requests).
``add_trunk_service`` registers the same servicer methods with raw bytes in
(``request_deserializer=None``) and parses them here, so that an undecodable message is an
``InvalidInputError("request", ...)``: INVALID_ARGUMENT through the servicer's one error path,
one rate-limited log line, no traceback. Replies are serialized as the generated code does,
and the method paths are the generated ones: generated stubs need no change.

Each RPC runs in its own asyncio task; ``RPC`` and ``CLIENT`` are context variables that hold
the RPC's name and (once authenticated) its client, for the servicer's refusal log.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from fedsea.errors import InvalidInputError
from fedsea.wire import fedsea_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Trunk"].full_name  # "fedsea.v1.Trunk"
RPC: ContextVar[str] = ContextVar("fedsea_rpc", default="")
CLIENT: ContextVar[str] = ContextVar("fedsea_client", default="")


class Failing(Protocol):
    """What the handlers need of the servicer besides its RPC methods: the error path."""

    async def _fail(self, context: Any, exc: BaseException) -> None: ...


def parse(cls: type[Message], data: bytes) -> Any:
    """``data`` parsed as a ``cls`` message; ``InvalidInputError("request", ...)`` if it is not one.

    The message never quotes the bytes, only their count and the type expected.
    """
    message = cls()
    try:
        message.ParseFromString(data)
    except Exception:  # DecodeError, and whatever else a parser may raise on bytes alone
        raise InvalidInputError("request", f"undecodable {cls.DESCRIPTOR.name} ({len(data)} bytes)") from None
    return message


async def _parsed(cls: type[Message], raw: AsyncIterable[bytes]) -> AsyncIterator[Any]:
    async for data in raw:
        yield parse(cls, data)


def _handler(servicer: Failing, name: str, request_cls: type[Message], reply_cls: type[Message], kind: str) -> Any:
    """The raw-bytes handler of RPC ``name``; ``kind`` is ``unary_unary``, ``stream_stream``, etc."""
    method: Callable[..., Any] = getattr(servicer, name)
    streaming_in, streaming_out = kind.startswith("stream"), kind.endswith("stream")

    async def request_of(raw: Any, context: Any) -> Any | None:
        RPC.set(name)
        if streaming_in:
            return _parsed(request_cls, raw)
        try:
            return parse(request_cls, raw)
        except InvalidInputError as exc:
            await servicer._fail(context, exc)  # aborts the RPC
            return None

    async def unary_out(raw: Any, context: Any) -> Any:
        request = await request_of(raw, context)
        return await method(request, context)

    async def stream_out(raw: Any, context: Any) -> AsyncIterator[Any]:
        request = await request_of(raw, context)
        async for reply in method(request, context):
            yield reply

    make: Callable[..., grpc.RpcMethodHandler[Any, Any]] = getattr(grpc, f"{kind}_rpc_method_handler")
    body: Callable[[Any, Any], Awaitable[Any] | AsyncIterator[Any]] = stream_out if streaming_out else unary_out
    return make(body, request_deserializer=None, response_serializer=reply_cls.SerializeToString)


def rpc_kinds() -> dict[str, str]:
    """Every RPC of the Trunk service, in the proto's order -> its grpc call kind (``unary_unary``,
    ``unary_stream``, ``stream_unary`` or ``stream_stream``: which multi-callable sends it)."""
    return {
        method.name: f"{'stream' if method.client_streaming else 'unary'}_"
        f"{'stream' if method.server_streaming else 'unary'}"
        for method in pb.DESCRIPTOR.services_by_name["Trunk"].methods
    }


def trunk_handlers(servicer: Failing) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """Every RPC of the Trunk service (from the proto's descriptor) -> its raw-bytes handler."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    methods = pb.DESCRIPTOR.services_by_name["Trunk"].methods_by_name
    for name, kind in rpc_kinds().items():
        method = methods[name]
        request_cls, reply_cls = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        handlers[name] = _handler(servicer, name, request_cls, reply_cls, kind)
    return handlers


def add_trunk_service(servicer: Failing, server: grpc.aio.Server) -> None:
    """Register ``servicer``'s RPCs on ``server`` (instead of ``add_TrunkServicer_to_server``)."""
    handlers = trunk_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
