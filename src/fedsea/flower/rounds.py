"""The ServerApp's rounds: fedsea's round logic with Flower sampling, messaging and aggregation.

Per round: every connected SuperNode not yet known is asked (a QUERY message) for its client
name, cut and cut schedule (``fedsea.flower.nodes``); the round's global adapter is staged on the
trunk server; the strategy samples the nodes, and each gets the round's cut (``head-layers``,
``tail-layers``: its schedule's), its head and tail slice of the global adapter at that cut and
the stage key; each
ClientApp loads its trunk blocks from the stage into its session, trains, publishes its trunk
adapter and replies with its head and tail; the trunk adapters are collected from the trunk
server and merged into the replies, each reply is checked (``check_update``) and clipped as the
native run does, and the Flower strategy aggregates the whole-model records.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsea.errors import InvalidInputError
from fedsea.federation.checkpoint import latest_round, load_round, save_round
from fedsea.federation.cuts import moves
from fedsea.federation.simconfig import RunPlan
from fedsea.federation.strategy import Update, clip_update
from fedsea.federation.strategy import make_strategy as native_strategy
from fedsea.federation.validation import check_update
from fedsea.flower.nodes import NodeInfo, _last_line, discover
from fedsea.flower.records import (
    arrays_of,
    block_of,
    config_of,
    head_tail_slice,
    metrics_of,
    scalar,
    to_record,
    to_state,
)
from fedsea.flower.runlog import round_line
from fedsea.flower.strategies import SERVER_STATE_NAME, FedProx64, strategy_name

logger = logging.getLogger(__name__)


class FlowerRounds:
    """Runs a fedsea federation's rounds over a Flower ``Grid``.

    Args:
        plan: the run plan (rounds, local steps, mode, checks).
        grid: Flower's grid of SuperNodes.
        operator: a ``TrunkOperator`` on the trunk server.
        trunk_address: told to the ClientApps (where the data plane is).
        num_layers: the model's blocks.
        strategy: a Flower strategy (``fedsea.flower.strategies.make_strategy``).
        run_dir: checkpoints and ``server_rounds.jsonl``; None: none written.
        run_id: names the stages (distinct runs may share a trunk server).
        secure_aggregation: aggregate the head/tail adapters with SecAgg+ (``fedsea.flower.secagg``):
            hierarchical mode, FedAvg and one cut (p, q) for all clients.
    """

    def __init__(
        self,
        plan: RunPlan,
        grid: Grid,
        operator: Any,
        trunk_address: str,
        num_layers: int,
        strategy: Any,
        run_dir: Path | None,
        run_id: str,
        secure_aggregation: bool = False,
    ) -> None:
        self.plan, self.fed = plan, plan.fed
        self.grid, self.operator, self.strategy = grid, operator, strategy
        self.trunk_address, self.num_layers = trunk_address, num_layers
        self.run_dir, self.run_id = run_dir, run_id
        self.nodes: dict[int, NodeInfo] = {}
        self.failures: dict[str, str] = {}  # this round's: client (or node) -> what Flower reported
        self.secure = secure_aggregation
        # The native coordinator's sampling (fraction, min_clients, seeded): see ``_sample``.
        self.sampler = native_strategy("fedavg", self.fed.fraction, self.fed.min_clients)
        if isinstance(strategy, FedProx64) and plan.optim.proximal_mu <= 0:
            raise ValueError("strategy fedprox needs [optim] proximal_mu > 0 (e.g. 0.01): the proximal term's weight")
        if secure_aggregation:  # mode hierarchical, FedAvg, one cut, two clients (else a ValueError)
            from fedsea.flower.secagg import check_plan

            check_plan(plan, strategy_name(strategy))

    # -- nodes --------------------------------------------------------------------------------
    def discover(self, wait_s: float) -> None:
        """Ask every connected node not yet known who it is and where it cuts (``fedsea.flower.nodes.discover``)."""
        discover(self, wait_s)

    # -- one round ------------------------------------------------------------------------------
    def message(self, template: Message, state: dict[str, torch.Tensor], key: str, round_number: int) -> Message:
        """The TRAIN message of ``template``'s node: its head/tail slice of ``state`` and the stage ``key``."""
        node = template.metadata.dst_node_id
        info = self.nodes[node]
        # A copy: a strategy's templates may share one config record, and each message has its own key.
        config = ConfigRecord(dict(config_of(template)))
        config.update({"stage-key": key, "trunk-address": self.trunk_address, "local-steps": self.fed.local_steps})
        config["server-round"] = round_number
        p, q = info.cut(round_number)  # the round's cut: the ClientApp re-splits its model there if it moved
        config.update({"head-layers": p, "tail-layers": q})
        arrays = to_record(head_tail_slice(state, self.num_layers, p, q))
        return Message(
            RecordDict({"arrays": arrays, "config": config}), dst_node_id=node, message_type=MessageType.TRAIN
        )

    def send(self, messages: list[Message]) -> list[Message]:
        """Send ``messages`` and wait for the replies (the round's deadline); the failed are noted and left out."""
        replies = list(self.grid.send_and_receive(messages, timeout=self.fed.round_timeout_s))
        for r in replies:
            if r.has_error():
                logger.warning("node %d failed its round: %s", r.metadata.src_node_id, r.error.reason)
                info = self.nodes.get(r.metadata.src_node_id)
                self.failures[info.name if info else f"node {r.metadata.src_node_id}"] = _last_line(r.error.reason)
        return [r for r in replies if not r.has_error()]

    def _train(self, messages: list[Message], state: dict[str, torch.Tensor], key: str) -> list[Message]:
        """Stage ``state``, send ``messages``, collect the trunk adapters of those who replied."""
        self.operator.stage(key, state)
        ok = self.send(messages)
        names = [str(scalar(config_of(r, "client"), "name")) for r in ok]
        trunks = self.operator.collect(key, names, drop=True)
        for reply, name in zip(ok, names, strict=True):
            config_of(reply, "client")["trunk"] = name in trunks
            if name in trunks:
                merged = {**to_state(arrays_of(reply)), **trunks[name]}
                reply.content["arrays"] = to_record(merged)
        return [r for r in ok if bool(scalar(config_of(r, "client"), "trunk"))]

    def checked(self, replies: list[Message], start: dict[str, torch.Tensor], refused: dict[str, str]) -> list[Message]:
        """The replies whose update passes ``check_update`` against ``start`` (clipped if the run says so)."""
        kept = []
        for reply in replies:
            name = str(scalar(config_of(reply, "client"), "name"))
            state = to_state(arrays_of(reply))
            try:
                missing = sorted(set(start) - set(state))
                if missing:
                    raise InvalidInputError(
                        "update", f"misses {len(missing)} tensors of the global adapter, e.g. {missing[0]}"
                    )
                check_update(state, start, "update", self.fed.max_update_rms)
            except InvalidInputError as exc:
                refused[name] = str(exc)
                logger.warning("refused the update of %s: %s", name, exc)
                continue
            if self.fed.clip_norm is not None:
                weight = float(scalar(metrics_of(reply), "num-examples"))
                state = dict(clip_update(Update(name, weight, state), start, self.fed.clip_norm).state)
                reply.content["arrays"] = to_record(state)
            kept.append(reply)
        return kept

    def _sequential(
        self,
        templates: list[Message],
        state: dict[str, torch.Tensor],
        key: str,
        round_number: int,
        refused: dict[str, str],
    ) -> tuple[list[Message], dict[str, torch.Tensor]]:
        """One client after the other, each starting from the trunk adapter the one before left."""
        replies: list[Message] = []
        current = dict(state)  # the global, its trunk blocks updated by each client in turn
        for i, template in enumerate(templates):
            turn = f"{key}/{i}"
            got = self.checked(self._train([self.message(template, current, turn, round_number)], current, turn),
                                current, refused)  # fmt: skip
            if not got:
                continue
            start, end = self.nodes[template.metadata.dst_node_id].trunk(round_number, self.num_layers)
            current.update({k: v for k, v in to_state(arrays_of(got[0])).items() if start <= block_of(k) < end})
            replies += got
        return replies, current

    def cuts(self, templates: list[Message], round_number: int) -> dict[str, list[int]]:
        """The round's cut [p, q] of each sampled client (the round record's ``cuts``)."""
        infos = [self.nodes[t.metadata.dst_node_id] for t in templates]
        return {info.name: list(info.cut(round_number)) for info in infos}

    def _in_a_trunk(self, key: str, names: list[str], round_number: int) -> bool:
        block = block_of(key)
        trunks = [n.trunk(round_number, self.num_layers) for n in self.nodes.values() if n.name in names]
        return any(start <= block < end for start, end in trunks)

    def _sample(self, round_number: int, state: dict[str, torch.Tensor]) -> list[Message]:
        """The strategy's TRAIN templates for this round's clients, in the order of their names.

        The clients are drawn as the native coordinator draws them (``Strategy.select``: seeded by
        the run's ``seed`` and the round number, from the sorted names of the connected known
        nodes), so a run repeats its sample and a native run of the same run file samples the
        same clients; the strategy (``fraction_train = 1``) is shown only those nodes.
        """
        connected = set(self.grid.get_node_ids())
        pool = {info.name: node for node, info in self.nodes.items() if node in connected}
        chosen = self.sampler.select(list(pool), round_number, self.fed.seed)
        view = _Sample(self.grid, [pool[name] for name in chosen])
        templates = [
            m for m in self.strategy.configure_train(round_number, to_record(state), ConfigRecord(), view)
            if m.metadata.dst_node_id in view.nodes
        ]  # fmt: skip
        return sorted(templates, key=lambda m: self.nodes[m.metadata.dst_node_id].name)

    def play(self, round_number: int, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Play one round from the global ``state``; returns the new global state and the round's record."""
        started = time.monotonic()
        self.failures = {}
        # The first round this process plays (a resumed run's too) waits for the expected nodes.
        self.discover(self.fed.join_timeout_s if not self.nodes else 0.0)
        templates = self._sample(round_number, state)
        selected = [self.nodes[m.metadata.dst_node_id].name for m in templates]
        key = f"{self.run_id}/round-{round_number}"
        refused: dict[str, str] = {}
        if self.secure:
            return self._play_secure(round_number, templates, state, key, selected, started)
        if self.fed.mode == "sequential":
            replies, current = self._sequential(templates, state, key, round_number, refused)
        elif self.fed.mode == "client-batch":
            from fedsea.flower.client_batch import play_groups

            replies, current = play_groups(self, templates, state, key, round_number, refused), state
        else:
            messages = [self.message(t, state, key, round_number) for t in templates]
            replies, current = self.checked(self._train(messages, state, key), state, refused), state
        done = [str(scalar(config_of(r, "client"), "name")) for r in replies]
        new_state = state
        if len(done) < self.fed.min_clients:
            logger.warning("round %d: %d of %d clients submitted (< min_clients); global unchanged",
                           round_number, len(done), len(selected))  # fmt: skip
        else:
            # In a fixed order: the float sums do not depend on who replied first (a resumed run
            # repeats an uninterrupted one bit for bit).
            replies.sort(key=lambda r: str(scalar(config_of(r, "client"), "name")))
            arrays, _ = self.strategy.aggregate_train(round_number, replies)
            if arrays is not None:
                new_state = {k: v.to(state[k].dtype) for k, v in to_state(arrays).items()}
            if self.fed.mode == "sequential":
                # The blocks trained as trunk are the chain's: as the last client left them.
                new_state.update({k: v for k, v in current.items() if self._in_a_trunk(k, done, round_number)})
        record = {
            "round": round_number,
            "selected": selected,
            "submitted": done,
            "dropped": sorted(set(selected) - set(done) - set(refused)),
            "losses": {
                str(scalar(config_of(r, "client"), "name")): float(scalar(metrics_of(r), "loss")) for r in replies
            },
            "samples": {
                str(scalar(config_of(r, "client"), "name")): float(scalar(metrics_of(r), "num-examples"))
                for r in replies
            },
            "refused": refused,
            "traffic": {str(scalar(config_of(r, "client"), "name")): _traffic(metrics_of(r)) for r in replies},
            "failed": dict(self.failures),
            "banned": [],
            "seconds": time.monotonic() - started,
            "mode": self.fed.mode,
            "engine": "flower",
            "cuts": self.cuts(templates, round_number),
        }
        return new_state, record

    def _play_secure(
        self, round_number: int, templates: list[Message], state: dict[str, torch.Tensor], key: str,
        selected: list[str], started: float,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # fmt: skip
        from fedsea.flower.secagg import play_secure

        new_state, clients, secure = play_secure(self, templates, state, key, round_number)
        done = [str(c["name"]) for c in clients]
        if new_state is None or len(done) < self.fed.min_clients:
            logger.warning("round %d: secure aggregation of %d of %d clients failed or too few; global unchanged",
                           round_number, len(done), len(selected))  # fmt: skip
            new_state = state
        record = {
            "round": round_number, "selected": selected, "submitted": done,
            "dropped": sorted(set(selected) - set(done)),
            "losses": {str(c["name"]): float(c["loss"]) for c in clients},
            "samples": {str(c["name"]): float(c["num-examples"]) for c in clients},
            "refused": {}, "traffic": {str(c["name"]): _traffic(c) for c in clients},
            "failed": dict(self.failures), "banned": [], "seconds": time.monotonic() - started,
            "mode": self.fed.mode, "cuts": self.cuts(templates, round_number),
            "engine": "flower", "secure-aggregation": secure,
        }  # fmt: skip
        return new_state, record

    # -- the strategy's server state --------------------------------------------------------------
    def _server_state(self) -> dict[str, Any] | None:
        """The strategy's state to checkpoint (FedAdam's moments), None for a stateless strategy."""
        state_dict = getattr(self.strategy, "state_dict", None)
        return state_dict() if callable(state_dict) else None

    def _restore_server_state(self, saved: dict[str, dict[str, Any]]) -> None:
        """Give the strategy back the state checkpointed with the round (a warning if it had some and none is there)."""
        load = getattr(self.strategy, "load_state_dict", None)
        if SERVER_STATE_NAME in saved and callable(load):
            load(saved[SERVER_STATE_NAME])
        elif callable(load):
            logger.warning("the checkpoint holds no %s state: it restarts", type(self.strategy).__name__)

    # -- the run ----------------------------------------------------------------------------------
    def run(self, state: dict[str, torch.Tensor], resume: bool = False) -> dict[str, torch.Tensor]:
        """Play the rounds (from the last checkpoint with ``resume``); returns the final global state."""
        import json

        first = 1
        if resume and self.run_dir is not None and (folder := latest_round(self.run_dir)) is not None:
            completed, state, saved, _ = load_round(folder)
            first = completed + 1
            self._restore_server_state(saved)
            logger.info("resuming after round %d", completed)
        for round_number in range(first, self.fed.rounds + 1):
            state, record = self.play(round_number, state)
            # A run that moves a cut says so in its round lines (``round_line``); the cuts are recorded either way.
            record["cuts-moved"] = any(moves(n.cuts, (n.head_layers, n.tail_layers)) for n in self.nodes.values())
            if self.run_dir is not None:
                # The strategy's server state (FedAdam's moments) goes into the round's folder with
                # the global adapter: written together, atomically, as safetensors (never pickle).
                server_state = self._server_state()
                optimizers = {SERVER_STATE_NAME: server_state} if server_state is not None else None
                save_round(self.run_dir, round_number, state, optimizers, {"record": record})
                with (self.run_dir / "server_rounds.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
            logger.info("%s", round_line(record, self.fed.rounds))
        return state


def _traffic(metrics: Any) -> list[int]:
    """A reply's data-plane bytes (its ``bytes-sent``, ``bytes-received`` metrics; 0 if absent)."""
    return [int(metrics.get("bytes-sent", 0)), int(metrics.get("bytes-received", 0))]


class _Sample:
    """A view of the ``Grid`` that shows a strategy only the sampled ``nodes`` (the rest is the grid's)."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self.grid, self.nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)
