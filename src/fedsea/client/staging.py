"""Trunk staging from the client side: Flower runs' trunk adapters, installed and collected on the trunk server.

In a Flower run the ServerApp stages the round's global trunk adapter on the trunk server
(``TrunkOperator.stage``), each ClientApp loads its session's trunk blocks from it
(``load_staged_trunk``), trains, and publishes its session's trained trunk adapter
(``publish_trunk``); the ServerApp collects them (``TrunkOperator.collect``) to average. Trunk
adapter bytes go between the ServerApp and the trunk server only, never through a client.

    with TrunkOperator("trunk:50051", token=operator_token, tls=ClientTls(ca=...)) as op:
        op.stage("run-abc/round-3", global_trunk)        # {"layers.N....": tensor}
        ...                                               # clients: load, train, publish
        states = op.collect("run-abc/round-3", drop=True)  # {client id: {"layers.N....": tensor}}

Server side: ``fedsea.server.staging``. The stage key is 1 to 128 chars of ``[A-Za-z0-9._/-]``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch

from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.adapters import assemble_state, named_chunks
from fedsea.wire.stage_keys import check_stage_key
from fedsea.wire.tensors import DEFAULT_CHUNK_BYTES

from .connection import ClientTls, Connection, ConnectionConfig
from .deadlines import ClientTimeouts
from .split_client import SplitClient


def load_staged_trunk(client: SplitClient, key: str) -> int:
    """Load ``client``'s session's trunk blocks from the stage ``key`` on its server; returns the tensor count.

    The session's trunk optimizer restarts (as after ``put_trunk_adapter``). Raises
    ``RemoteError`` NOT_FOUND for an unknown key, INVALID_ARGUMENT (naming the tensor) for a
    stage that lacks one of the session's trunk tensors or has it in another shape.
    """
    connection, session_id = client.require_connection()
    request = pb.StagedRequest(session_id=session_id, key=check_stage_key(key))
    response = connection.unary("load_staged", connection.stub.LoadStagedTrunk, request, kind="adapter")
    # The server's trunk adapter is now the stage's, which this client never held: a lost server
    # cannot be resumed from here (``SplitClient.reopen_session``) unless it fetches the adapter.
    client._server_trunk, client._trunk_known = None, False
    return int(response.tensors)


def publish_trunk(client: SplitClient, key: str) -> int:
    """Publish ``client``'s session's current trunk adapter under ``key`` on its server; returns the tensor count.

    The stage ``key`` must still exist (NOT_FOUND otherwise); publishing again replaces the
    client's earlier state under the key.
    """
    connection, session_id = client.require_connection()
    request = pb.StagedRequest(session_id=session_id, key=check_stage_key(key))
    response = connection.unary("publish_trunk", connection.stub.PublishTrunk, request, kind="adapter")
    return int(response.tensors)


class TrunkOperator:
    """The operator's channel to a trunk server: stage global trunk adapters, collect the clients' states.

    Needs an operator token (``fedsea token add NAME --operator``), or a server with no client
    authentication at all. Opens its channel on construction; use ``with`` or ``close()``.

    Args:
        address: ``host:port`` of ``fedsea serve``.
        token: the operator's bearer token.
        tls: CA (and for mutual TLS the certificate and key); ``None`` is plaintext.
        timeouts: deadlines (``ClientTimeouts``: staging and collecting are ``adapter`` calls).
        retries: resends of a call on UNAVAILABLE, within its deadline.
        chunk_bytes: tensor bytes per message of a stage (1 MiB; the server's message limit,
            ``max_message_bytes``, must exceed it by 64 KiB: give less to a server started with less).
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls: ClientTls | None = None,
        timeouts: ClientTimeouts | None = None,
        retries: int = 3,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        config = ConnectionConfig(address, tls=tls, token=token, timeouts=timeouts or ClientTimeouts(), retries=retries)
        self.connection: Connection | None = Connection(config)
        self.chunk_bytes = chunk_bytes

    def _require(self) -> Connection:
        if self.connection is None:
            raise ValueError("the TrunkOperator is closed")
        return self.connection

    def stage(
        self,
        key: str,
        state: dict[str, torch.Tensor],
        group: Sequence[str] | None = None,
        step_timeout_s: float = 300.0,
    ) -> None:
        """Stage ``state`` (global keys ``layers.N....``, float32 on the wire) under ``key``, replacing an old one.

        ``group``: the clients of a client-batch group, in the joint pass's row order. Their
        loads of this stage join them to one shared trunk session, whose steps join their batches
        and wait up to ``step_timeout_s`` for every member (the late are then left out); collect
        returns that session's adapter once, under ``fedsea.server.batching.GROUP_OWNER``.
        """
        connection = self._require()
        check_stage_key(key)
        if not state:
            raise ValueError("stage: the state holds no tensors")
        spec = None if group is None else pb.StageGroup(members=list(group), step_timeout_s=step_timeout_s)

        def requests() -> Iterator[pb.NamedTensorChunk]:
            for i, message in enumerate(named_chunks(state, self.chunk_bytes, session_id=key)):
                if i == 0 and spec is not None:
                    message.group.CopyFrom(spec)
                yield message

        connection.stream("stage_trunk", connection.stub.StageTrunk, requests, kind="adapter")

    def collect(
        self, key: str, client_ids: Sequence[str] = (), drop: bool = False
    ) -> dict[str, dict[str, torch.Tensor]]:
        """The trunk adapters published under ``key``: client id -> state (global keys, float32).

        ``client_ids``: only these (all that published, if empty); a client that published
        nothing is absent. ``drop``: the server frees the returned states and the stage after sending.
        """
        connection = self._require()
        request = pb.CollectRequest(key=check_stage_key(key), client_ids=list(client_ids), drop=drop)
        messages = connection.collect("collect_trunk", connection.stub.CollectTrunk, request, kind="adapter")
        by_client: dict[str, list[pb.NamedTensorChunk]] = defaultdict(list)
        for message in messages:
            by_client[message.session_id].append(message)
        return {client: assemble_state(chunks, f"collect[{client}]") for client, chunks in by_client.items()}

    def close(self) -> None:
        """Close the channel (stages left on the server expire after its idle timeout)."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def __enter__(self) -> TrunkOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["TrunkOperator", "load_staged_trunk", "publish_trunk"]
