"""The SuperNodes of a Flower run: who each is (its QUERY reply) and where it cuts the model, round by round.

A node's ClientApp answers the ServerApp's QUERY with its client name, its cut (p, q), its
sample count and, when its node config asks for one, its own cut schedule (``cuts``, the run
file's list as a TOML string: ``"[[3, 4, 1], [5, 2, 2]]"``). The ServerApp settles the node's
schedule (``settle_schedule``):

- the run file's ``cuts`` for the client, if any, else the node's own;
- both given: they must be the same list, else the node is refused (a conflict is an error,
  never a silent choice: the data owner and the run file's author disagree about where the
  owner's data leaves its machine);
- a node's schedule is checked as the run file's is (rounds 1 to ``federation.rounds``,
  every cut valid for the model), and, under secure aggregation or per-part LoRA, refused if it
  moves the cut (one cut for all).

A refused node is left out as a node whose query failed (``failed`` in the round record, the
reason logged); the run goes on with the others.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedsea.errors import FedseaError
from fedsea.federation.cuts import (
    Cut,
    Schedule,
    check_schedule_model,
    check_schedule_rounds,
    cut_at,
    moves,
    parse_schedule,
    schedule_text,
)
from fedsea.flower.records import config_of, scalar

if TYPE_CHECKING:
    from fedsea.flower.rounds import FlowerRounds

logger = logging.getLogger("fedsea.flower.rounds")


@dataclass(frozen=True)
class NodeInfo:
    """What a SuperNode's ClientApp told the ServerApp: its client name, cut and sample count, and its
    settled cut schedule (``cuts``: ``(round, p, q)`` entries; empty: (head_layers, tail_layers) throughout)."""

    name: str
    head_layers: int
    tail_layers: int
    num_examples: int
    cuts: Schedule = ()

    def cut(self, round_number: int) -> Cut:
        """The node's (p, q) in round ``round_number``."""
        return cut_at(self.cuts, (self.head_layers, self.tail_layers), round_number)

    def trunk(self, round_number: int, num_layers: int) -> tuple[int, int]:
        """The trunk blocks [p, L - q) the node's session trains in round ``round_number``."""
        p, q = self.cut(round_number)
        return p, num_layers - q


def settle_schedule(rounds: FlowerRounds, name: str, default: Cut, asked: str) -> Schedule:
    """The cut schedule of client ``name``: the run file's, or the node's own (``asked``, its node config's).

    Raises:
        ValueError: the node's schedule is malformed, conflicts with the run file's, does not fit
            the run or the model, or moves the cut where one cut is needed (secure aggregation,
            per-part LoRA).
    """
    plans = {c.name: c for c in rounds.plan.clients}
    planned: Schedule = tuple(plans[name].cuts or ()) if name in plans else ()
    if not asked.strip():
        return planned
    where = f"{name}: node config cuts"
    own = parse_schedule(asked, where)
    if planned and own != planned:
        raise ValueError(
            f"{where} {schedule_text(own)} conflicts with the run file's cuts {schedule_text(planned)} for "
            f"{name}; give the schedule in one place (the node config, or the run file's [[clients]] cuts)"
        )
    check_schedule_rounds(own, rounds.fed.rounds, where)
    check_schedule_model(own, default, rounds.num_layers, where, rounds.plan.model)
    if moves(own, default):
        if rounds.secure:
            raise ValueError(
                f"{where} {schedule_text(own)} moves the cut, but secure aggregation needs one cut for all clients "
                "in every round: drop the node's cuts (or move every client with the run file's [client] cuts)"
            )
        if rounds.plan.lora_cut is not None:
            raise ValueError(
                f"{where} {schedule_text(own)} moves the cut, but the run's parts have different LoRA "
                f"({rounds.plan.lora.summary()}): a block would change its LoRA shape; drop the node's cuts"
            )
    return own


def discover(rounds: FlowerRounds, wait_s: float) -> None:
    """Ask every connected node not yet known for its name, cut, samples and schedule (QUERY messages).

    Waits up to ``wait_s`` for ``expected_clients`` nodes first. A node answers once its
    ClientApp has loaded its model and data, so the query has the round's deadline.
    """
    fed, grid = rounds.fed, rounds.grid
    deadline = time.monotonic() + wait_s
    while len(list(grid.get_node_ids())) < fed.expected_clients and time.monotonic() < deadline:
        time.sleep(0.5)  # the first round waits for the expected nodes, as the native run does
    new = [n for n in grid.get_node_ids() if n not in rounds.nodes]
    if not new:
        if not rounds.nodes:  # else the rounds would "complete" with nobody training
            raise FedseaError(f"no SuperNode connected within {wait_s:.0f} s (federation.join_timeout_s)")
        return
    config = ConfigRecord({"trunk-address": rounds.trunk_address})
    messages = [Message(RecordDict({"config": config}), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
    failed: list[str] = []

    def refuse(node: int, reason: str) -> None:
        logger.warning("node %d did not answer the query: %s", node, reason)
        rounds.failures[f"node {node}"] = f"query: {reason}"
        failed.append(f"node {node}: {reason}")

    # The first query is the native run's join (model and data loaded): the join timeout's, not a round's.
    for reply in grid.send_and_receive(messages, timeout=max(wait_s, fed.round_timeout_s)):
        node = reply.metadata.src_node_id
        if reply.has_error():
            refuse(node, _last_line(reply.error.reason))
            continue
        c = config_of(reply, "client")
        name, p, q = str(scalar(c, "name")), int(scalar(c, "head-layers")), int(scalar(c, "tail-layers"))
        try:
            cuts = settle_schedule(rounds, name, (p, q), str(c.get("cuts", "")))
        except (ValueError, FedseaError) as exc:
            refuse(node, str(exc))
            continue
        info = NodeInfo(name, p, q, int(scalar(c, "num-examples")), cuts)
        rounds.nodes[node] = info
        moving = f", cuts {schedule_text(cuts)}" if cuts else ""
        logger.info("node %d is client %s (p, q) = (%d, %d)%s, %d examples", node, name, p, q, moving,
                    info.num_examples)  # fmt: skip
    if not rounds.nodes:
        raise FedseaError(f"no SuperNode could join the run: {'; '.join(failed) or 'none answered the query'}")


def _last_line(reason: str | None) -> str:
    """The gist of a failure Flower relays (a remote traceback): its last line naming an error (300 chars)."""
    lines = [line.strip() for line in str(reason or "").splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line or "Exception" in line]
    return (named[-1] if named else lines[-1] if lines else "unknown")[:300]
