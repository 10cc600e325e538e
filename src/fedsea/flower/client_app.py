"""fedsea's Flower ``ClientApp``: ``fedsea.flower.client_app:app`` (see ``fedsea.flower``).

A SuperNode's node config says who the data owner is (all optional in a simulation, where the
run folder holds each simulated client's shard, token and certificates, by ``partition-id``):

- ``name``: the client's name in the run file (``[[clients]]``) and on the trunk server (its token's);
- ``data`` (a JSONL file) or ``shard`` (a task shard): the local training data (without them,
  the run file's ``[[clients]] data`` for this client; ``data_source``);
- ``token-file``: the file holding the client's trunk-server token;
- ``tls-ca`` (and ``tls-cert``, ``tls-key`` for mutual TLS): the trunk server's CA;
- ``trunk-address``: overrides the address the ServerApp sends (another route to the same server);
- ``state-dir``: this client's folder for its noise secret and its log (``steps.jsonl``); a
  simulation uses the run folder's ``clients/<name>``;
- ``log``: a JSONL file for this client's steps instead of ``state-dir``'s;
- ``cuts``: the cut schedule this data owner asks for, the run file's list as a string,
  ``"[[3, 4, 1], [5, 2, 2]]"`` (round, p, q); reported in the QUERY reply, settled by the
  ServerApp (``fedsea.flower.nodes``: a run file's own schedule for the client must be the same).

Each TRAIN message names the round's cut (``head-layers``, ``tail-layers``); a participant at
another cut is re-split there first (``_at_cut``: a new trunk session, the noise recalibrated).

Participants (the model split, its noise and the trunk session) are kept between messages in
this process, the last ``FEDSEA_FLOWER_CLIENTS`` (default 4) of them: Flower's simulation runs
many virtual clients in a few worker processes. Nothing of a round depends on that cache: a
participant rebuilt in a fresh process (the Deployment Engine starts one ``flwr-clientapp``
process per message) trains from the global head and tail it is sent, the trunk blocks staged
on the trunk server, the run's seeds and the noise secret in ``state-dir``. Their trunk sessions
are closed when the process exits: the trunk server allows each client only
``max_sessions_per_client`` (default 8) open sessions, which leaked ones would use up.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsea.flower.records import arrays_of, config_of, scalar, to_record, to_state
from fedsea.flower.secagg import secure_aggregation_mod
from fedsea.flower.settings import FlowerRun

app = ClientApp()
_PARTICIPANTS: OrderedDict[tuple[int, str], Any] = OrderedDict()


@atexit.register
def _close_participants() -> None:
    """Close the trunk sessions of this process's participants (the process ends with its message)."""
    while _PARTICIPANTS:
        _PARTICIPANTS.popitem()[1].close()  # SplitClient.close never raises (a server gone is fine)


def _me(context: Context) -> tuple[FlowerRun, Any, Any, Path]:
    """This node's run, its ``ClientPlan`` and the plan, and the run folder."""
    run = FlowerRun.from_config(dict(context.run_config))
    plan = run.plan()
    node = dict(context.node_config)
    names = {c.name: c for c in plan.clients}
    if "name" in node:
        name = str(node["name"])
        if name not in names:
            raise ValueError(f"node config name {name!r} is not a client of the run file; it has {', '.join(names)}")
    elif "partition-id" in node:
        pid = int(node["partition-id"])
        if not 0 <= pid < len(plan.clients):
            raise ValueError(f"partition-id {pid}: the run file has {len(plan.clients)} clients (federation.clients)")
        name = plan.clients[pid].name
    else:
        raise ValueError("the node config names no client: give name=... (or run in a simulation)")
    return run, names[name], plan, Path(run.run_dir)


def _participant(context: Context, address: str, config: Any = None) -> Any:
    """This node's participant: cached in this process, else built (``_build``), at the cut of the
    TRAIN message's ``config`` if it names one (else the run file's: a QUERY)."""
    _, me, plan, run_dir = _me(context)
    cache_key = (int(context.run_id), me.name)
    if cache_key in _PARTICIPANTS:
        _PARTICIPANTS.move_to_end(cache_key)
        return _PARTICIPANTS[cache_key]
    if config is not None and "head-layers" in config:
        # Built at the round's cut at once (the Deployment Engine starts a process per message):
        # no split and noise calibration at the run file's cut only to move it.
        cut = {"head_layers": int(config["head-layers"]), "tail_layers": int(config["tail-layers"])}
        me = dataclasses.replace(me, **cut)
    try:
        participant = _build(context, me, plan, run_dir, address)
    except Exception as exc:  # Flower reports it by node id only: say which client failed to start
        raise RuntimeError(f"{me.name}: {exc}") from exc
    _PARTICIPANTS[cache_key] = participant
    while len(_PARTICIPANTS) > max(1, int(os.environ.get("FEDSEA_FLOWER_CLIENTS", "4"))):
        _PARTICIPANTS.popitem(last=False)[1].close()
    return participant


def data_source(node: dict[str, Any], mine: Path, me: Any) -> tuple[str | None, str | None, Any]:
    """Where client ``me``'s training data comes from: (shard, data, own) for ``load_client_data``.

    In order: the node config's ``data`` (a JSONL on this machine) or ``shard``; the shard a
    simulation's run folder holds for the client (``state-dir``'s ``shard.json``); the client's
    own file named in the run file (``[[clients]] data`` or ``[task] data``).

    Raises:
        ValueError: none of them, naming what to give.
    """
    if "data" in node or "shard" in node:
        return (str(node["shard"]) if "shard" in node else None), (str(node["data"]) if "data" in node else None), None
    if (mine / "shard.json").is_file():
        return str(mine / "shard.json"), None, None
    if getattr(me, "data", None) is not None:
        return None, None, me
    raise ValueError(
        f"{me.name}: no training data: give the node config data=FILE (a JSONL file on this machine), or name "
        "the client's file in the run file ([[clients]] data)"
    )


def _build(context: Context, me: Any, plan: Any, run_dir: Path, address: str) -> Any:
    """A participant for client ``me``: its model split, data, token, TLS, noise and trunk session."""
    from fedsea.client.connection import ClientTls
    from fedsea.federation.client import load_noise_secret
    from fedsea.federation.data import load_client_data
    from fedsea.federation.participant import build_participant
    from fedsea.federation.report import noise_record
    from fedsea.flower.trunk import client_tls, client_token
    from fedsea.model.load import load_tokenizer

    node = dict(context.node_config)
    mine = Path(str(node["state-dir"])) if "state-dir" in node else run_dir / "clients" / me.name
    model = plan.config.model.placed(me.device, me.dtype)
    tokenizer = load_tokenizer(model.source)
    shard, data, own = data_source(node, mine, me)
    examples = load_client_data(tokenizer, shard, data, me.max_length, own, plan.config.task.holdout)
    token = (
        Path(str(node["token-file"])).read_text().strip() if "token-file" in node else client_token(run_dir, me.name)
    )
    tls: ClientTls | None
    if "tls-ca" in node:
        cert, key = (Path(str(node[k])) if k in node else None for k in ("tls-cert", "tls-key"))
        tls = ClientTls(Path(str(node["tls-ca"])), cert, key)
    else:
        tls = client_tls(run_dir)
    log = Path(str(node["log"])) if "log" in node else mine / "steps.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)

    def on_step(round_number: int, step: int, loss: float) -> None:
        with log.open("a") as f:
            f.write(json.dumps({"client": me.name, "round": round_number, "step": step, "loss": loss}) + "\n")

    participant = build_participant(
        plan, me, model, examples, tokenizer, str(node.get("trunk-address", address)), wire=plan.config.wire,
        token=token, tls=tls, noise_secret=load_noise_secret(mine / "noise.secret"), on_step=on_step,
    )  # fmt: skip
    participant.log = log
    with log.open("a") as f:  # the report's noise record, as fedsea join writes it
        f.write(json.dumps({"client": me.name, "noise": noise_record(participant.noise, me.head_layers)}) + "\n")
    return participant


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this node is: client name, cut (p, q), number of examples, and the cut schedule its node
    config asks for (``cuts``, checked here; the ServerApp settles it against the run file's)."""
    from fedsea.federation.cuts import parse_schedule, schedule_text

    _, me, _, _ = _me(context)
    node = dict(context.node_config)
    asked = schedule_text(parse_schedule(str(node["cuts"]), f"{me.name}: node config cuts")) if "cuts" in node else ""
    participant = _participant(context, str(scalar(config_of(msg), "trunk-address")))
    info = ConfigRecord(
        {
            "name": participant.fed.name,
            # The run file's cut (round 1's before any schedule): the split may have moved since.
            "head-layers": me.head_layers,
            "tail-layers": me.tail_layers,
            "num-examples": len(participant.fed.examples),
            "cuts": asked,
        }
    )
    return Message(RecordDict({"client": info}), reply_to=msg)


def _at_cut(context: Context, participant: Any, config: Any, round_number: int) -> Any:
    """``participant`` at the round's cut (the config's ``head-layers``/``tail-layers``): re-split if it moved.

    The move closes the trunk session and opens one at the new cut (``fedsea.federation.recut``),
    recalibrates the noise at the new p and logs the new noise record (its sigma) with the round.
    """
    from fedsea.federation.recut import recut_participant
    from fedsea.federation.report import noise_record

    split = participant.client.split
    cut = (int(config.get("head-layers", split.head_layers)), int(config.get("tail-layers", split.tail_layers)))
    if cut == (split.head_layers, split.tail_layers):
        return participant
    _, me, plan, _ = _me(context)
    cache_key = (int(context.run_id), me.name)
    _PARTICIPANTS.pop(cache_key, None)  # closed by the move: never reused if the move fails
    participant = recut_participant(participant, plan, me, *cut)
    _PARTICIPANTS[cache_key] = participant
    with participant.log.open("a") as f:  # a new session (its own byte totals) and the noise at the new p
        record = {"client": me.name, "round": round_number, "cut": list(cut)}
        f.write(json.dumps({**record, "noise": noise_record(participant.noise, cut[0])}) + "\n")
    return participant


@app.train(mods=[secure_aggregation_mod])  # SecAgg+ when the ServerApp runs it; a no-op otherwise
def train(msg: Message, context: Context) -> Message:
    """One round: load the trunk blocks from the stage, train locally, publish the trunk, reply head and tail.

    In client-batch mode (``client-batch`` in the config) the load joins the session to its
    group's shared trunk session on the trunk server, the steps train that one with the other
    members', and nothing is published: the ServerApp collects the group's adapter once.
    """
    from fedsea.client.staging import load_staged_trunk, publish_trunk
    from fedsea.errors import RemoteError
    from fedsea.model.adapters import adapter_state_dict

    config = config_of(msg)
    address = str(scalar(config, "trunk-address"))
    key, round_number = str(scalar(config, "stage-key")), int(scalar(config, "server-round"))
    participant = _at_cut(context, _participant(context, address, config), config, round_number)
    meter = participant.client.connection.meter
    before = (meter.bytes_sent, meter.bytes_received)
    try:
        load_staged_trunk(participant.client, key)
    except RemoteError as exc:
        # A participant cached in this worker while other workers served its client may find its
        # session closed by the trunk server (idle_timeout_s, default 600 s): build it afresh,
        # as a new process would; the stage gives the new session its trunk blocks.
        if exc.code != "NOT_FOUND" or "session" not in exc.message:
            raise
        _PARTICIPANTS.pop((int(context.run_id), participant.fed.name)).close()
        participant = _at_cut(context, _participant(context, address, config), config, round_number)
        meter = participant.client.connection.meter
        before = (meter.bytes_sent, meter.bytes_received)
        load_staged_trunk(participant.client, key)
    client, fed = participant.client, participant.fed
    result = fed.train_round(round_number, int(scalar(config, "local-steps")), to_state(arrays_of(msg)))
    if not bool(config.get("client-batch", False)):  # a group's shared adapter is collected as the group's
        publish_trunk(client, key)
    state = {**adapter_state_dict(client.split.head), **adapter_state_dict(client.split.tail)}
    sent, received = meter.bytes_sent - before[0], meter.bytes_received - before[1]
    with participant.log.open("a") as f:
        # The cut it trained at: the noise record before it may be another worker's (a simulation
        # hands a client's messages to any of its processes, each with its own participant).
        cut = [client.split.head_layers, client.split.tail_layers]
        record = {"client": fed.name, "round": round_number, "cut": cut, "samples": result.samples}
        record.update(
            bytes_sent=sent, bytes_received=received, total_sent=meter.bytes_sent, total_received=meter.bytes_received
        )
        f.write(json.dumps(record) + "\n")
    metrics = MetricRecord(
        {"num-examples": result.samples, "loss": sum(result.losses) / len(result.losses), "bytes-sent": sent,
         "bytes-received": received}
    )  # fmt: skip
    return Message(
        RecordDict({"arrays": to_record(state), "metrics": metrics, "client": ConfigRecord({"name": fed.name})}),
        reply_to=msg,
    )
