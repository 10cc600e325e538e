"""The gRPC servicer: each RPC decodes its request, makes one call, encodes the answer.

The calls go to the transport-free ``TrunkHost`` (sessions, adapters), the ``StepRouter``
(training steps), the ``GenerationHost`` (inference streams), a federated run's
``RoundService`` and, for Flower runs, the ``TrunkStaging`` store (its RPCs are the
``StagingRpcs`` mixin, ``fedsea.server.staging_service``); ``fedsea.wire`` converts messages;
errors become status codes here. Compute runs in a one-thread executor so the event loop keeps
serving other clients (and their errors) while a forward or backward is computing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import torch

from fedsea.errors import FedseaError, IdleTimeoutError, InvalidInputError, ProtocolError
from fedsea.server.batching import GroupBatcher
from fedsea.server.budget import InflightBudget, StreamTicket, receive_budgeted_state, receive_budgeted_tensor
from fedsea.server.calls import abort_with, identify, sees_server, streaming, unary
from fedsea.server.generation import GenerationHost, GenStream
from fedsea.server.multitenant import JointScheduler
from fedsea.server.refusals import RefusalLog
from fedsea.server.rounds import RoundService
from fedsea.server.staging import TrunkStaging
from fedsea.server.staging_service import StagingRpcs
from fedsea.server.steps import StepRouter
from fedsea.server.trunk import Session, SessionSpec, TrunkHost
from fedsea.version import __version__
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire import fedsea_pb2_grpc as pb_grpc
from fedsea.wire.accounting import TrafficMeter
from fedsea.wire.adapters import chunk_bytes_under, named_chunks, round_messages
from fedsea.wire.auth import TokenStore
from fedsea.wire.compress import check_session
from fedsea.wire.convert import limits_to_pb, rpc_stats_to_pb, session_settings
from fedsea.wire.tensors import DEFAULT_CHUNK_BYTES, TensorAssembler, encode_into

logger = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M")
# Request and response types differ per RPC; the servicer handles them as protobuf messages.
Context = grpc.aio.ServicerContext[Any, Any]
_unary, _streaming = unary, streaming  # every RPC's wrapper: the caller identified, every error a status


class TrunkServicer(StagingRpcs, pb_grpc.TrunkServicer):
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
        self.scheduler = JointScheduler(self.generation, self._compute, host.limits)  # streams' joint passes
        self.staging = TrunkStaging(host)  # Flower runs' trunk adapters (``StagingRpcs``)
        self.staging.groups.compute = self.run_blocking  # client-batch groups' joint passes
        self.steps = StepRouter(host, self._compute, self._group_of)
        self.tokens = tokens
        self.meters: dict[str, TrafficMeter] = {}
        self.refusals = RefusalLog(logger)  # one line per refused request, rate-limited
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedsea-compute")
        # Replies in chunks of DEFAULT_CHUNK_BYTES (the size ``fedsea bench wire`` found fastest),
        # or smaller under a low message limit.
        self.chunk_bytes = chunk_bytes_under(host.limits.max_message_bytes, DEFAULT_CHUNK_BYTES)
        # A CUDA trunk gets its inputs from pinned buffers: a faster copy to the GPU.
        self._pin = host.model.device.type == "cuda"
        # Partial request streams' bytes, budgeted; a session that closes frees its streams' buffers.
        self.budget = InflightBudget(host.limits)
        host.on_drop.append(lambda session: self.budget.session_closed(session.owner, session.id))

    # -- plumbing ------------------------------------------------------------------------------
    def _client(self, context: Context) -> str:
        """The caller's identity (``calls.identify``); UNAUTHENTICATED for a missing or unknown token."""
        return identify(self.tokens, context)

    def _meter(self, client: str) -> TrafficMeter:
        return self.meters.setdefault(client, TrafficMeter())

    def _metered(
        self, client: str, rpc: str, messages: Iterable[M], received: int = 0, compute_s: float = 0.0
    ) -> Iterator[M]:
        """Yield ``messages``, then count them (and what came in) for ``client``'s ``rpc``."""
        sent = 0
        for message in messages:
            sent += message.ByteSize()  # type: ignore[attr-defined]
            yield message
        self._meter(client).record(rpc, sent=sent, received=received, compute_s=compute_s)

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

    async def _fail(self, context: Context, exc: BaseException) -> None:
        """Abort with ``exc``'s status, a capped detail and one rate-limited log line (``calls.abort_with``)."""
        await abort_with(self.refusals, context, exc)

    def _group_of(self, owner: str, session_id: str) -> GroupBatcher | None:
        """The client-batch group a session trains in: its native run's, else a Flower stage's, or None."""
        if self.coordinator is not None and (group := self.coordinator.batcher_for(owner, session_id)) is not None:
            return group
        return self.staging.groups.batcher_for(owner, session_id)

    def _coordinator(self) -> RoundService:
        if self.coordinator is None:
            raise ProtocolError("this server runs no federated run (start it with fedsea serve --run CONFIG)")
        return self.coordinator

    def _wire_dtype(self, client: str, first: Any, chunk: pb.TensorChunk, field: str) -> int:
        """The wire dtype of a step stream's session (NOT_FOUND before any work); h~_p's limits and
        the chunk's compression (none or the session's) checked before its bytes are assembled."""
        session: Session = self.host.get(client, first.session_id)
        if field == "hidden":
            self.host.check_hidden_shape(tuple(chunk.shape))
        check_session(field, chunk.compression, session.spec.wire_compression)
        return session.spec.wire_dtype

    def _compression(self, client: str, session_id: str) -> int:
        """The compression a session's replies are sent in."""
        return self.host.get(client, session_id).spec.wire_compression

    def shutdown(self) -> None:
        """Stop the compute thread (pending calls are cancelled)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- sessions ------------------------------------------------------------------------------
    @_unary
    async def OpenSession(self, client: str, request: pb.OpenSessionRequest, context: Context) -> Any:
        """Open a training session: the trunk adapter the client asks for, on the blocks between its cuts."""
        lora, optim, dtype, codec = session_settings(request)
        p, q = int(request.head_layers), int(request.tail_layers)
        spec = SessionSpec(p, q, lora, optim, dtype, int(request.seed), codec)
        session, seconds = await self._compute(self.host.open_session, client, request.base_fingerprint, spec)
        self._meter(client).record("open_session", received=request.ByteSize(), compute_s=seconds)
        logger.info("client %s opened session %s (p=%d, q=%d)", client, session.id, spec.head_layers, spec.tail_layers)
        return pb.OpenSessionResponse(
            session_id=session.id,
            num_layers=self.host.num_layers,
            hidden_size=self.host.hidden_size,
            trunk_start=session.trunk.start,
            trunk_end=session.trunk.end,
            limits=limits_to_pb(self.host.limits),
            server_version=__version__,
        )

    @_unary
    async def CloseSession(self, client: str, request: pb.CloseSessionRequest, context: Context) -> Any:
        """Close a session and free its memory."""
        await self._compute(self.host.close_session, client, request.session_id)
        self._meter(client).record("close_session", received=request.ByteSize())
        logger.info("client %s closed session %s", client, request.session_id)
        return pb.CloseSessionResponse()

    # -- training ------------------------------------------------------------------------------
    @_streaming
    async def Forward(self, client: str, requests: AsyncIterator[pb.ForwardRequest], context: Context) -> Any:
        """A step's h~_p (B, n, d) in, h_{L-q} (B, n, d) out."""
        check = functools.partial(self._wire_dtype, client, field="hidden")
        with self.budget.stream(client) as ticket:  # the request's bytes, until its step is computed
            first, hidden, dtype, received = await receive_budgeted_tensor(
                requests, "hidden", self.host.limits, ticket, check, self._pin
            )
            lengths = torch.tensor(list(first.lengths), dtype=torch.int64)
            out, seconds = await self.steps.forward(
                client, first.session_id, first.step, hidden, lengths, first.micro_batch, first.micro_batches
            )
            del hidden  # the graph keeps what it needs

        def forward_reply(head: bool) -> pb.ForwardResponse:
            return pb.ForwardResponse(step=first.step, compute_s=seconds, micro_batch=first.micro_batch)

        # Chunks written straight into the replies (one copy of the bytes, not two).
        codec = self._compression(client, first.session_id)
        replies = encode_into(out, dtype, self.chunk_bytes, forward_reply, "hidden", codec)
        for message in self._metered(client, "forward", replies, received, seconds):
            yield message

    @_streaming
    async def Backward(self, client: str, requests: AsyncIterator[pb.BackwardRequest], context: Context) -> Any:
        """A step's dL/dh_{L-q} (B, n, d) in, dL/dh~_p (B, n, d) out; the trunk adapter steps if asked."""
        check = functools.partial(self._wire_dtype, client, field="grad")
        with self.budget.stream(client) as ticket:  # the request's bytes, until its step is computed
            first, grad, dtype, received = await receive_budgeted_tensor(
                requests, "grad", self.host.limits, ticket, check, self._pin
            )
            grad_in, seconds = await self.steps.backward(
                client, first.session_id, first.step, grad, first.update, first.micro_batch, first.micro_batches
            )
            del grad

        def backward_reply(head: bool) -> pb.BackwardResponse:
            return pb.BackwardResponse(step=first.step, compute_s=seconds, micro_batch=first.micro_batch)

        codec = self._compression(client, first.session_id)
        replies = encode_into(grad_in, dtype, self.chunk_bytes, backward_reply, "grad", codec)
        for message in self._metered(client, "backward", replies, received, seconds):
            yield message

    # -- adapters --------------------------------------------------------------------------------
    @_unary
    async def PutTrunkAdapter(self, client: str, requests: AsyncIterator[pb.NamedTensorChunk], context: Any) -> Any:
        """Replace the session's trunk adapter."""
        session = lambda m: self.host.get(client, m.session_id)  # noqa: E731  # NOT_FOUND before any bytes are kept
        with self.budget.stream(client) as ticket:  # the state's bytes, as they arrive, until it is loaded
            first, state, received = await receive_budgeted_state(
                requests, "adapter", self.host.limits, ticket, named=lambda m: m, on_first=session
            )
            count, seconds = await self._compute(self.host.put_adapter, client, first.session_id, state)
        self._meter(client).record("put_adapter", received=received, compute_s=seconds)
        return pb.PutAdapterResponse(tensors=count)

    @_streaming
    async def GetTrunkAdapter(self, client: str, request: pb.AdapterRequest, context: Any) -> Any:
        """The session's trunk adapter, float32."""
        state, seconds = await self._compute(self.host.get_adapter, client, request.session_id)
        replies = named_chunks(state, self.chunk_bytes)
        for message in self._metered(client, "get_adapter", replies, request.ByteSize(), seconds):
            yield message

    # -- generation --------------------------------------------------------------------------
    async def Generate(self, request_iterator: AsyncIterator[pb.GenerateRequest], context: Any) -> Any:
        """One inference stream: open, prefill, decode steps (and rewinds), close. The cache is freed on every exit."""
        stream: GenStream | None = None
        ticket: StreamTicket | None = None
        assembler: TensorAssembler | None = None
        try:
            client = self._client(context)
            requests = request_iterator.__aiter__()
            idle, gap = self.host.limits.idle_timeout_s, self.host.limits.stream_timeout_s
            ticket = self.budget.open(client)  # a step's bytes, as they arrive, until it is computed

            async def next_request() -> pb.GenerateRequest | None:
                # Between steps the client may think (idle_timeout_s); inside a step's chunks, stream_timeout_s.
                wait = gap if assembler is not None else idle
                try:
                    return await asyncio.wait_for(requests.__anext__(), wait)
                except StopAsyncIteration:
                    return None
                except TimeoutError:
                    what = "half-sent step" if assembler is not None else "cache"
                    message = f"inference stream idle for more than {wait:g} s; its {what} was freed"
                    raise IdleTimeoutError(message) from None

            first = await next_request()
            if first is None:
                return
            if first.WhichOneof("kind") != "open":
                raise InvalidInputError("open", "the first message of a stream must open it")
            stream = self.generation.open(client, first.open.session_id, first.open.max_length, first.open.naive)
            ticket.session_id = stream.session.id
            dtype, codec = stream.session.spec.wire_dtype, stream.session.spec.wire_compression
            meter = self._meter(client)
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
                    check_session("hidden", head.hidden.compression, codec)
                    limit = self.host.limits.max_tensor_bytes
                    assembler = TensorAssembler("hidden", limit, dtype, allow_compression=True, charge=ticket)
                    ticket.track(assembler)
                assembler.add(request.step.hidden)
                if not assembler.complete:
                    continue
                assert head is not None
                out, seconds = await self.scheduler.step(
                    stream, head.step, assembler.tensor(), list(head.lengths), list(head.keep_rows)
                )
                sent = 0
                reply = functools.partial(_generate_reply, head.step)
                for response in encode_into(out, dtype, self.chunk_bytes, reply, "hidden", codec):
                    sent += response.ByteSize()
                    yield response
                meter.record("generate", sent=sent, received=received, compute_s=seconds)
                assembler, head, received = None, None, 0
                self.budget.settle(ticket)
        except Exception as exc:  # every error becomes a status
            await self._fail(context, exc)
        finally:
            if ticket is not None:  # a half-sent step's buffer goes now, not with a garbage collection
                self.budget.close(ticket)
            if stream is not None:
                self.generation.close(stream)
                self.scheduler.stream_closed()

    # -- federation ----------------------------------------------------------------------------
    @_unary
    async def JoinRun(self, client: str, request: pb.JoinRequest, context: Context) -> Any:
        """Admit a training session to the federated run; tell it the run's shape."""
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

    @_streaming
    async def AwaitRound(self, client: str, request: pb.RoundRequest, context: Any) -> Any:
        """Wait for the next round: its header, then the client's head and tail tensors if selected."""
        coordinator = self._coordinator()
        number, selected, finished, state = await coordinator.await_round(client, int(request.after_round))
        steps = coordinator.run_info().local_steps
        messages = round_messages(number, selected, finished, steps, state, self.chunk_bytes)
        yield next(messages)  # the header, not counted (as ever)
        for message in self._metered(client, "await_round", messages, request.ByteSize()):
            yield message

    @_unary
    async def SubmitUpdate(self, client: str, requests: AsyncIterator[pb.SubmitChunk], context: Any) -> Any:
        """A selected client's head and tail update for the open round."""
        coordinator = self._coordinator()
        header: list[pb.SubmitChunk] = []  # its round, should a tensor be refused (NaN/Inf): the client's fault
        with self.budget.stream(client) as ticket:  # the update's bytes, as they arrive, until it is taken
            try:
                first, state, received = await receive_budgeted_state(
                    requests,
                    "update",
                    self.host.limits,
                    ticket,
                    named=lambda m: m.tensor if m.tensor.name else None,  # the header carries no tensor
                    on_first=header.append,
                )
            except InvalidInputError as exc:
                if header:
                    await coordinator.refuse(client, int(header[0].round), str(exc))
                raise
            await coordinator.submit(client, int(first.round), int(first.num_samples), float(first.loss), state)
        self._meter(client).record("submit", received=received)
        return pb.SubmitResponse(accepted=True)

    @_unary
    async def GetStats(self, client: str, request: pb.StatsRequest, context: Context) -> Any:
        """This client's traffic, sessions and cache use; the server's (all clients') cache use only to an
        operator (``calls.sees_server``), zero to anyone else."""
        report = self._meter(client).as_dict()["rpcs"]
        assert isinstance(report, dict)
        server_wide = sees_server(self.tokens, client, context)
        return pb.StatsResponse(
            rpcs=rpc_stats_to_pb(report),
            open_sessions=self.host.open_sessions(client),
            generation_sessions=self.generation.count(client),
            cache_bytes=self.generation.cache_bytes(client),
            server_cache_bytes=self.generation.cache_bytes() if server_wide else 0,
            server_reserved_bytes=self.generation.reserved_bytes() if server_wide else 0,
        )


__all__ = ["FedseaError", "TrunkServicer"]


def _generate_reply(step: int, first: bool) -> pb.GenerateResponse:
    return pb.GenerateResponse(step=step)
