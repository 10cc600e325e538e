"""The gRPC face of trunk staging (``fedsea.server.staging``): four RPCs of the Trunk service.

A mixin of ``TrunkServicer`` (which keeps ``service.py`` under 400 lines): each RPC decodes its
request, makes one call to the ``TrunkStaging`` store, encodes the answer, as the servicer's
other RPCs do (same wrappers, budgets, metering and refusal log).

- ``StageTrunk`` (operator): a global trunk adapter in, as ``NamedTensorChunk`` messages with
  the stage key in the first message's ``session_id`` (and for a client-batch group's stage,
  its members and step timeout in the first message's ``group``).
- ``LoadStagedTrunk`` (client, own session): the session's trunk blocks loaded from a stage.
- ``PublishTrunk`` (client, own session): the session's trunk adapter copied into the published states.
- ``CollectTrunk`` (operator): the published states out, each message's ``session_id`` the
  publishing client's id; ``drop`` frees them and the stage afterwards.

An operator is a caller with an operator token, or any caller of a server with no client
authentication at all (``calls.sees_server``: every caller is then the one ``anonymous``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from fedsea.errors import PermissionDeniedError
from fedsea.server.budget import InflightBudget, receive_budgeted_state
from fedsea.server.calls import sees_server, streaming, unary
from fedsea.server.staging import TrunkStaging
from fedsea.server.trunk import TrunkHost
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.accounting import TrafficMeter
from fedsea.wire.adapters import named_chunks
from fedsea.wire.auth import TokenStore

T = TypeVar("T")
M = TypeVar("M")
Context = grpc.aio.ServicerContext[Any, Any]


class StagingRpcs:
    """``StageTrunk``, ``LoadStagedTrunk``, ``PublishTrunk`` and ``CollectTrunk`` over ``self.staging``."""

    if TYPE_CHECKING:  # what the servicer provides
        host: TrunkHost
        tokens: TokenStore | None
        budget: InflightBudget
        staging: TrunkStaging
        chunk_bytes: int

        def _meter(self, client: str) -> TrafficMeter: ...

        def _metered(
            self, client: str, rpc: str, messages: Iterable[M], received: int = 0, compute_s: float = 0.0
        ) -> Iterator[M]: ...

        async def _compute(self, fn: Callable[..., T], *args: Any) -> tuple[T, float]: ...

    def _operator(self, client: str, context: Context, rpc: str) -> None:
        """PERMISSION_DENIED unless ``client`` is an operator (``calls.sees_server``)."""
        if not sees_server(self.tokens, client, context):
            raise PermissionDeniedError(f"{rpc} is for the operator: call it with an operator token")

    @unary
    async def StageTrunk(self, client: str, requests: AsyncIterator[pb.NamedTensorChunk], context: Context) -> Any:
        """Stage a global trunk adapter under the key in the first message's ``session_id`` (operator)."""
        self._operator(client, context, "StageTrunk")
        with self.budget.stream(client) as ticket:  # the state's bytes, as they arrive, until it is stored
            first, state, received = await receive_budgeted_state(
                requests,
                "stage",
                self.host.limits,
                ticket,
                named=lambda m: m,
                on_first=lambda m: self.staging.check_room(m.session_id),  # a bad key or no room: before any bytes
            )
            group = None
            if first.HasField("group"):  # a client-batch group's stage (``fedsea.server.stage_groups``)
                group = (list(first.group.members), float(first.group.step_timeout_s))
            count, _ = await self._compute(self.staging.stage, first.session_id, state, group)
        self._meter(client).record("stage_trunk", received=received)
        return pb.PutAdapterResponse(tensors=count)

    @unary
    async def LoadStagedTrunk(self, client: str, request: pb.StagedRequest, context: Context) -> Any:
        """Load the caller's session's trunk blocks from a stage (strict: every tensor, shaped right)."""
        count, seconds = await self._compute(self.staging.load, client, request.session_id, request.key)
        self._meter(client).record("load_staged", received=request.ByteSize(), compute_s=seconds)
        return pb.PutAdapterResponse(tensors=count)

    @unary
    async def PublishTrunk(self, client: str, request: pb.StagedRequest, context: Context) -> Any:
        """Copy the caller's session's trunk adapter into the published states under (key, caller)."""
        count, seconds = await self._compute(self.staging.publish, client, request.session_id, request.key)
        self._meter(client).record("publish_trunk", received=request.ByteSize(), compute_s=seconds)
        return pb.PutAdapterResponse(tensors=count)

    @streaming
    async def CollectTrunk(self, client: str, request: pb.CollectRequest, context: Context) -> Any:
        """The states published under a key, each message naming its client; with ``drop``, freed after (operator)."""
        self._operator(client, context, "CollectTrunk")
        # On the compute thread: a client-batch group's adapter is copied under the compute lock.
        states, _ = await self._compute(self.staging.collect, request.key, list(request.client_ids))

        def replies() -> Iterator[pb.NamedTensorChunk]:
            for publisher, state in states.items():
                for message in named_chunks(state, self.chunk_bytes):
                    message.session_id = publisher  # on every message: the client can group them
                    yield message

        for message in self._metered(client, "collect_trunk", replies(), request.ByteSize()):
            yield message
        if request.drop:  # after the last message was taken: a call cut short frees nothing
            await self._compute(self.staging.drop, request.key, list(states))  # what was sent, not what came since
