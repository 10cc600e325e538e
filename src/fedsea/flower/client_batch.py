"""Client-batch mode on Flower: the round's clients train one shared trunk adapter per cut.

As the native coordinator does (``fedsea.federation.groups``), the sampled clients are grouped
by their trunk blocks [p, L - q); each group trains one trunk adapter together, the trunk server
joining the members' batches into one trunk pass per step (``fedsea.server.stage_groups``):

1. the ServerApp stages the round's global adapter once per group, naming the group's members
   (sorted by name: the joint pass's rows) and the step timeout (``round_timeout_s``, as native);
2. every member gets a TRAIN message with its group's stage key and ``client-batch`` set; its
   ClientApp's load of the stage joins its session to the group, it trains its local steps
   (each step waits for the other members), and it replies with its head and tail;
3. the ServerApp collects each group's shared adapter (once), checks it against the round's
   start (``check_update``; a bad one is no single client's fault: its blocks keep the round's
   start for its members, and ``refused`` names the group), merges it into each member's reply,
   and the strategy aggregates the whole-model replies.

Merging the group's adapter into each member's reply and weighting by the member's examples
gives the group's blocks the weight of all its members together: the native aggregate, whose
group update weighs the sum of its members' examples.

The members must run at the same time (each step waits for all): on the Simulation Engine
``fedsea.flower.simulation`` gives the run as many ClientApp actors as a round samples clients.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from flwr.app import Message

from fedsea.errors import InvalidInputError
from fedsea.federation.validation import check_update
from fedsea.flower.records import arrays_of, block_of, config_of, scalar, to_record, to_state
from fedsea.server.batching import GROUP_OWNER

if TYPE_CHECKING:
    from fedsea.flower.rounds import FlowerRounds

logger = logging.getLogger(__name__)


def group_key(key: str, start: int, end: int) -> str:
    """The stage key of the round ``key``'s group training trunk blocks [start, end)."""
    return f"{key}/group-{start}-{end}"


def play_groups(
    rounds: FlowerRounds,
    templates: list[Message],
    state: dict[str, torch.Tensor],
    key: str,
    round_number: int,
    refused: dict[str, str],
) -> list[Message]:
    """One client-batch round: stage a group per cut, train, merge each group's adapter into its members' replies.

    Returns the replies that passed ``FlowerRounds.checked`` (whole-model states), for the strategy.
    """
    groups: dict[tuple[int, int], list[Message]] = {}
    for template in templates:
        # Grouped by the round's cut: a client whose cut moved this round trains with that cut's group.
        trunk = rounds.nodes[template.metadata.dst_node_id].trunk(round_number, rounds.num_layers)
        groups.setdefault(trunk, []).append(template)
    messages = []
    for (start, end), members in sorted(groups.items()):
        names = [rounds.nodes[m.metadata.dst_node_id].name for m in members]  # sorted: the templates are
        gkey = group_key(key, start, end)
        rounds.operator.stage(gkey, state, group=names, step_timeout_s=rounds.fed.round_timeout_s)
        for template in members:
            message = rounds.message(template, state, gkey, round_number)
            config_of(message)["client-batch"] = True
            messages.append(message)
    replies = rounds.send(messages)
    by_name = {str(scalar(config_of(r, "client"), "name")): r for r in replies}
    kept: list[Message] = []
    for (start, end), members in sorted(groups.items()):
        gkey = group_key(key, start, end)
        shared = rounds.operator.collect(gkey, (), drop=True).get(GROUP_OWNER)
        done = [by_name[n] for m in members if (n := rounds.nodes[m.metadata.dst_node_id].name) in by_name]
        start_part = {k: v for k, v in state.items() if start <= block_of(k) < end}
        if shared is None:  # no member loaded the stage: none of them can have trained
            if done:
                refused[f"trunk:group-{start}-{end}"] = "no member joined the group on the trunk server"
            continue
        try:
            check_update(shared, start_part, "trunk adapter", rounds.fed.max_update_rms)
        except InvalidInputError as exc:  # trained by several clients: refused as a whole, no one's fault
            logger.warning("round %d: refused the trunk adapter of group [%d, %d): %s", round_number, start, end, exc)
            refused[f"trunk:group-{start}-{end}"] = str(exc)
            shared = start_part  # its blocks keep the round's start for its members
        for reply in done:
            config_of(reply, "client")["trunk"] = True
            reply.content["arrays"] = to_record({**to_state(arrays_of(reply)), **shared})
            kept.append(reply)
    return rounds.checked(kept, state, refused)
