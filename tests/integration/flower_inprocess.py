"""fedsea's Flower ServerApp and ClientApps in one process, over an in-process ``Grid`` (tests).

Flower's Simulation Engine gives every virtual SuperNode the same node config (``partition-id``);
a test of what a node's own config does (e.g. ``cuts``) needs nodes configured one by one, as
on the Deployment Engine, without starting a SuperLink and SuperNodes. ``InProcessGrid`` is the
part of Flower's ``Grid`` the ServerApp uses (``get_node_ids``, ``send_and_receive``): it hands
each message to fedsea's real ``ClientApp`` at once, in this process, with that node's context,
and answers an exception as Flower does (an error reply carrying the traceback). Messages are
handled one after the other: hierarchical and sequential mode (a client-batch group, whose
members must step together, needs the Simulation Engine).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedsea.flower import client_app
from fedsea.flower.server_app import serve_run
from fedsea.flower.settings import FlowerRun

RUN_ID = 7


class InProcessGrid:
    """Nodes ``1..N`` with the given node configs, each served by fedsea's ClientApp in this process."""

    def __init__(self, run_config: dict[str, Any], node_configs: list[dict[str, Any]]) -> None:
        self.contexts = {
            i + 1: Context(
                run_id=RUN_ID, node_id=i + 1, node_config=dict(node), state=RecordDict(), run_config=dict(run_config)
            )
            for i, node in enumerate(node_configs)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        def handle(message: Message) -> Message:
            try:
                return client_app.app(message, self.contexts[message.metadata.dst_node_id])
            except Exception:  # Flower's runtime answers a ClientApp's exception with an error reply
                return Message(Error(code=1, reason=traceback.format_exc()), reply_to=message)

        return [handle(m) for m in messages]


@contextmanager
def flower_in_process() -> Iterator[None]:
    """The ServerApp's task identity (Flower's messages need one), and the ClientApps' trunk sessions closed after."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        client_app._close_participants()
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_in_process(run_file: Path, run_dir: Path, node_configs: list[dict[str, Any]], **config: Any) -> dict[str, Any]:
    """Play the run file's rounds with these nodes; returns the final global adapter."""
    run_config = {"run-file": str(run_file), "run-dir": str(run_dir), "report": False, **config}
    with flower_in_process():
        grid = InProcessGrid(run_config, node_configs)
        return serve_run(FlowerRun.from_config(run_config), grid, str(RUN_ID))  # type: ignore[arg-type]
