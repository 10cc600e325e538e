"""The gRPC servicer: decode, call the transport-free ``TrunkHost``, encode, map errors.

Compute runs in a one-thread executor so the event loop keeps serving other clients (and
their errors) while a forward or backward is computing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import torch

from fedsea.config import LoraSpec, OptimConfig
from fedsea.errors import FedseaError, IdleTimeoutError, InvalidInputError, ProtocolError, status_code_name
from fedsea.model.masks import check_lengths
from fedsea.server.generation import GenerationHost, GenStream
from fedsea.server.rounds import RoundService
from fedsea.server.trunk import SessionSpec, TrunkHost
from fedsea.version import __version__
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire import fedsea_pb2_grpc as pb_grpc
from fedsea.wire.accounting import TrafficMeter
from fedsea.wire.auth import TokenStore, bearer
from fedsea.wire.tensors import ITEMSIZE, TensorAssembler, encode

logger = logging.getLogger(__name__)
T = TypeVar("T")
# Framing headroom under the message limit for everything in a chunk message but its bytes.
FRAME_HEADROOM = 64 * 1024


def _spec_from_request(req: pb.OpenSessionRequest) -> SessionSpec:
    try:
        lora = LoraSpec(
            r=int(req.trunk_lora.r),
            alpha=float(req.trunk_lora.alpha),
            dropout=float(req.trunk_lora.dropout),
            target_modules=tuple(req.trunk_lora.target_modules),
        )
        o = req.optimizer
        optim = OptimConfig(
            lr=o.lr,
            weight_decay=o.weight_decay,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            max_grad_norm=o.max_grad_norm if o.max_grad_norm > 0 else None,
        )
    except ValueError as exc:
        raise InvalidInputError("open_session", str(exc)) from exc
    if req.wire_dtype not in ITEMSIZE:
        raise InvalidInputError("wire_dtype", f"unknown wire dtype {req.wire_dtype} (expected fp32, bf16 or fp16)")
    return SessionSpec(int(req.head_layers), int(req.tail_layers), lora, optim, int(req.wire_dtype), int(req.seed))


class TrunkServicer(pb_grpc.TrunkServicer):
    """gRPC face of a ``TrunkHost``.

    Args:
        host: sessions and compute.
        tokens: per-client tokens; without them a client is named by its mTLS certificate's
            common name, or ``anonymous``.
    """

    def __init__(self, host: TrunkHost, tokens: TokenStore | None = None) -> None:
        self.host = host
        self.coordinator: RoundService | None = None  # set when the server runs a federated run
        self.generation = GenerationHost(host)
        self.tokens = tokens
        self.meters: dict[str, TrafficMeter] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedsea-compute")
        self.chunk_bytes = max(1024, host.limits.max_message_bytes - FRAME_HEADROOM)

    # -- plumbing ------------------------------------------------------------------------------
    def _client(self, context: grpc.aio.ServicerContext) -> str:
        if self.tokens is not None:
            return self.tokens.authenticate(bearer(context.invocation_metadata()))
        names = context.auth_context().get("x509_common_name") or []
        return names[0].decode() if names else "anonymous"

    def _meter(self, client: str) -> TrafficMeter:
        return self.meters.setdefault(client, TrafficMeter())

    async def _compute(self, fn: Callable[..., T], *args: Any) -> tuple[T, float]:
        def timed() -> tuple[T, float]:
            start = time.perf_counter()
            result = fn(*args)
            return result, time.perf_counter() - start

        return await asyncio.get_running_loop().run_in_executor(self._executor, timed)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the compute thread and return its result (for the coordinator)."""
        result, _ = await self._compute(fn, *args)
        return result

    async def _fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        code = status_code_name(exc)
        if code == "INTERNAL":
            logger.exception("internal error", exc_info=exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        await context.abort(grpc.StatusCode[code], str(exc))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- sessions ------------------------------------------------------------------------------
    async def OpenSession(self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            client = self._client(context)
            spec = _spec_from_request(request)
            session, seconds = await self._compute(self.host.open_session, client, request.base_fingerprint, spec)
            limits = self.host.limits
            self._meter(client).record("open_session", received=request.ByteSize(), compute_s=seconds)
            logger.info(
                "client %s opened session %s (p=%d, q=%d)", client, session.id, spec.head_layers, spec.tail_layers
            )
            return pb.OpenSessionResponse(
                session_id=session.id,
                num_layers=self.host.num_layers,
                hidden_size=self.host.hidden_size,
                trunk_start=session.trunk.start,
                trunk_end=session.trunk.end,
                limits=pb.Limits(
                    max_seq_len=limits.max_seq_len,
                    max_batch=limits.max_batch,
                    max_message_bytes=limits.max_message_bytes,
                    max_sessions_per_client=limits.max_sessions_per_client,
                    idle_timeout_s=limits.idle_timeout_s,
                ),
                server_version=__version__,
            )
        except Exception as exc:
            await self._fail(context, exc)

    async def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            client = self._client(context)
            await self._compute(self.host.close_session, client, request.session_id)
            self._meter(client).record("close_session", received=request.ByteSize())
            return pb.CloseSessionResponse()
        except Exception as exc:
            await self._fail(context, exc)

    # -- training ------------------------------------------------------------------------------
    async def _receive(
        self, client: str, requests: AsyncIterator[Any], field: str
    ) -> tuple[Any, torch.Tensor, int, int]:
        """Read a chunked request stream: (first message, tensor, wire dtype, bytes received)."""
        first = None
        assembler: TensorAssembler | None = None
        received = 0
        dtype = 0
        async for req in requests:
            received += req.ByteSize()
            chunk = getattr(req, field)
            if first is None:
                first = req
                session = self.host.get(client, req.session_id)  # NOT_FOUND before any work
                dtype = session.spec.wire_dtype
                if field == "hidden":
                    self.host.check_hidden_shape(tuple(chunk.shape))
                assembler = TensorAssembler(field, self.host.limits.max_tensor_bytes, dtype)
            assert assembler is not None
            assembler.add(chunk)
        if first is None or assembler is None:
            raise InvalidInputError("request", "empty request stream")
        return first, assembler.tensor(), dtype, received

    async def Forward(self, request_iterator: AsyncIterator[pb.ForwardRequest], context: Any) -> Any:
        try:
            client = self._client(context)
            first, hidden, dtype, received = await self._receive(client, request_iterator, "hidden")
            lengths = torch.tensor(list(first.lengths), dtype=torch.int64)
            group = self.coordinator.batcher_for(client, first.session_id) if self.coordinator else None
            if group is not None:
                # Validate alone first: one client's bad tensor must not fail the whole group.
                check_lengths(lengths, hidden.shape[0], hidden.shape[1])
                if not bool(torch.isfinite(hidden).all()):
                    raise InvalidInputError("hidden", "contains NaN or Inf")
                start = time.perf_counter()
                out = await group.forward(client, first.session_id, hidden.float(), lengths)
                seconds = time.perf_counter() - start
            else:
                out, seconds = await self._compute(
                    self.host.forward, client, first.session_id, first.step, hidden, lengths
                )
            sent = 0
            for chunk in encode(out, dtype, self.chunk_bytes):
                response = pb.ForwardResponse(step=first.step, hidden=chunk, compute_s=seconds)
                sent += response.ByteSize()
                yield response
            self._meter(client).record("forward", sent=sent, received=received, compute_s=seconds)
        except Exception as exc:
            await self._fail(context, exc)

    async def Backward(self, request_iterator: AsyncIterator[pb.BackwardRequest], context: Any) -> Any:
        try:
            client = self._client(context)
            first, grad, dtype, received = await self._receive(client, request_iterator, "grad")
            group = self.coordinator.batcher_for(client, first.session_id) if self.coordinator else None
            if group is not None:
                if not bool(torch.isfinite(grad).all()):
                    raise InvalidInputError("grad", "contains NaN or Inf")
                start = time.perf_counter()
                grad_in = await group.backward(client, first.session_id, grad.float())
                seconds = time.perf_counter() - start
            else:
                grad_in, seconds = await self._compute(
                    self.host.backward, client, first.session_id, first.step, grad, first.update
                )
            sent = 0
            for chunk in encode(grad_in, dtype, self.chunk_bytes):
                response = pb.BackwardResponse(step=first.step, grad=chunk, compute_s=seconds)
                sent += response.ByteSize()
                yield response
            self._meter(client).record("backward", sent=sent, received=received, compute_s=seconds)
        except Exception as exc:
            await self._fail(context, exc)

    # -- adapters --------------------------------------------------------------------------------
    async def PutTrunkAdapter(self, request_iterator: AsyncIterator[pb.NamedTensorChunk], context: Any) -> Any:
        try:
            client = self._client(context)
            session_id: str | None = None
            assemblers: dict[str, TensorAssembler] = {}
            received = 0
            async for req in request_iterator:
                received += req.ByteSize()
                if session_id is None:
                    session_id = req.session_id
                    self.host.get(client, session_id)
                if req.name not in assemblers:
                    if len(assemblers) >= 100_000:
                        raise InvalidInputError("adapter", "too many tensors")
                    assemblers[req.name] = TensorAssembler(f"adapter[{req.name}]", self.host.limits.max_tensor_bytes)
                assemblers[req.name].add(req.tensor)
            if session_id is None:
                raise InvalidInputError("request", "empty request stream")
            state = {name: a.tensor().float() for name, a in assemblers.items()}
            for name, tensor in state.items():
                if not bool(torch.isfinite(tensor).all()):
                    raise InvalidInputError(f"adapter[{name}]", "contains NaN or Inf")
            count, seconds = await self._compute(self.host.put_adapter, client, session_id, state)
            self._meter(client).record("put_adapter", received=received, compute_s=seconds)
            return pb.PutAdapterResponse(tensors=count)
        except Exception as exc:
            await self._fail(context, exc)

    async def GetTrunkAdapter(self, request: pb.AdapterRequest, context: Any) -> Any:
        try:
            client = self._client(context)
            state, seconds = await self._compute(self.host.get_adapter, client, request.session_id)
            sent = 0
            for name in sorted(state):
                for chunk in encode(state[name], pb.FLOAT32, self.chunk_bytes):
                    message = pb.NamedTensorChunk(name=name, tensor=chunk)
                    sent += message.ByteSize()
                    yield message
            self._meter(client).record("get_adapter", sent=sent, received=request.ByteSize(), compute_s=seconds)
        except Exception as exc:
            await self._fail(context, exc)

    # -- generation --------------------------------------------------------------------------
    async def Generate(self, request_iterator: AsyncIterator[pb.GenerateRequest], context: Any) -> Any:
        """One inference stream: open, prefill, decode steps (and rewinds), close. The cache is freed on every exit."""
        stream: GenStream | None = None
        try:
            client = self._client(context)
            requests = request_iterator.__aiter__()
            idle = self.host.limits.idle_timeout_s

            async def next_request() -> pb.GenerateRequest | None:
                try:
                    return await asyncio.wait_for(requests.__anext__(), idle)
                except StopAsyncIteration:
                    return None
                except TimeoutError:
                    raise IdleTimeoutError(
                        f"inference stream idle for more than {idle:g} s; its cache was freed"
                    ) from None

            first = await next_request()
            if first is None:
                return
            if first.WhichOneof("kind") != "open":
                raise InvalidInputError("open", "the first message of a stream must open it")
            stream = self.generation.open(client, first.open.session_id, first.open.max_length, first.open.naive)
            dtype = stream.session.spec.wire_dtype
            meter = self._meter(client)
            assembler: TensorAssembler | None = None
            head: pb.GenerateStep | None = None
            received = 0
            while (request := await next_request()) is not None:
                kind = request.WhichOneof("kind")
                if kind == "close":
                    break
                if kind == "rewind":
                    if assembler is not None:
                        raise InvalidInputError("rewind", "a rewind cannot come between the chunks of a step")
                    received += request.ByteSize()  # counted with the next step
                    await self._compute(self.generation.rewind, stream, request.rewind.length)
                    continue
                if kind != "step":
                    raise InvalidInputError("request", f"expected a step, rewind or close, got {kind}")
                received += request.ByteSize()
                if assembler is None:
                    head = request.step
                    self.host.check_hidden_shape(tuple(head.hidden.shape))
                    assembler = TensorAssembler("hidden", self.host.limits.max_tensor_bytes, dtype)
                assembler.add(request.step.hidden)
                if not assembler.complete:
                    continue
                assert head is not None
                out, seconds = await self._compute(
                    self.generation.step,
                    stream,
                    head.step,
                    assembler.tensor(),
                    list(head.lengths),
                    list(head.keep_rows),
                )
                sent = 0
                for chunk in encode(out, dtype, self.chunk_bytes):
                    response = pb.GenerateResponse(step=head.step, hidden=chunk)
                    sent += response.ByteSize()
                    yield response
                meter.record("generate", sent=sent, received=received, compute_s=seconds)
                assembler, head, received = None, None, 0
        except Exception as exc:  # every error becomes a status
            await self._fail(context, exc)
        finally:
            if stream is not None:
                self.generation.close(stream)

    # -- federation ----------------------------------------------------------------------------
    def _coordinator(self) -> RoundService:
        if self.coordinator is None:
            raise ProtocolError("this server runs no federated run (start it with fedsea serve --run CONFIG)")
        return self.coordinator

    async def JoinRun(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            client = self._client(context)
            coordinator = self._coordinator()
            await coordinator.join(client, request.session_id, int(request.num_samples))
            info = coordinator.run_info()
            self._meter(client).record("join", received=request.ByteSize())
            return pb.JoinResponse(
                client_id=client,
                rounds=info.rounds,
                local_steps=info.local_steps,
                mode=info.mode,
                next_round=info.next_round,
                seed=info.seed,
            )
        except Exception as exc:
            await self._fail(context, exc)

    async def AwaitRound(self, request: pb.RoundRequest, context: Any) -> Any:
        try:
            client = self._client(context)
            coordinator = self._coordinator()
            number, selected, finished, state = await coordinator.await_round(client, int(request.after_round))
            steps = coordinator.run_info().local_steps
            yield pb.RoundMessage(round=number, selected=selected, finished=finished, local_steps=steps)
            sent = 0
            for name in sorted(state):
                for chunk in encode(state[name], pb.FLOAT32, self.chunk_bytes):
                    message = pb.RoundMessage(round=number, tensor=pb.NamedTensorChunk(name=name, tensor=chunk))
                    sent += message.ByteSize()
                    yield message
            self._meter(client).record("await_round", sent=sent, received=request.ByteSize())
        except Exception as exc:
            await self._fail(context, exc)

    async def SubmitUpdate(self, request_iterator: AsyncIterator[pb.SubmitChunk], context: Any) -> Any:
        try:
            client = self._client(context)
            coordinator = self._coordinator()
            first: pb.SubmitChunk | None = None
            assemblers: dict[str, TensorAssembler] = {}
            received = 0
            async for req in request_iterator:
                received += req.ByteSize()
                first = first or req
                if not req.tensor.name:
                    continue
                if req.tensor.name not in assemblers:
                    if len(assemblers) >= 100_000:
                        raise InvalidInputError("update", "too many tensors")
                    limit = self.host.limits.max_tensor_bytes
                    assemblers[req.tensor.name] = TensorAssembler(f"update[{req.tensor.name}]", limit)
                assemblers[req.tensor.name].add(req.tensor.tensor)
            if first is None:
                raise InvalidInputError("request", "empty request stream")
            state = {name: a.tensor().float() for name, a in assemblers.items()}
            for name, tensor in state.items():
                if not bool(torch.isfinite(tensor).all()):
                    raise InvalidInputError(f"update[{name}]", "contains NaN or Inf")
            if first.num_samples < 1:
                raise InvalidInputError("num_samples", "must be >= 1")
            await coordinator.submit(client, int(first.round), int(first.num_samples), float(first.loss), state)
            self._meter(client).record("submit", received=received)
            return pb.SubmitResponse(accepted=True)
        except Exception as exc:
            await self._fail(context, exc)

    async def GetStats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            client = self._client(context)
            report = self._meter(client).as_dict()["rpcs"]
            assert isinstance(report, dict)
            rpcs = [
                pb.RpcStats(
                    rpc=name,
                    calls=c["calls"],
                    bytes_received=c["bytes_received"],
                    bytes_sent=c["bytes_sent"],
                    compute_s=c["compute_s"],
                )
                for name, c in report.items()
            ]
            return pb.StatsResponse(
                rpcs=rpcs,
                open_sessions=self.host.open_sessions(client),
                generation_sessions=self.generation.count(client),
                cache_bytes=self.generation.cache_bytes(client),
                server_cache_bytes=self.generation.cache_bytes(),
                server_reserved_bytes=self.generation.reserved_bytes(),
            )
        except Exception as exc:
            await self._fail(context, exc)


__all__ = ["FedseaError", "TrunkServicer"]
