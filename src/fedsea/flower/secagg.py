"""Secure aggregation of the clients' head and tail adapters with Flower's SecAgg+.

With ``secure-aggregation = true`` the ServerApp learns only the weighted sum of the clients'
head/tail updates, never one client's. Flower 1.42's ``SecAggPlusWorkflow`` (server) and
``secaggplus_mod`` (client) run the protocol; this module is the glue between them and fedsea's
round:

- server side, ``secure_train`` drives ``SecAggPlusWorkflow`` through a ``LegacyContext`` whose
  legacy strategy hands the workflow fedsea's per-node TRAIN messages (``configure_fit``) and
  takes the unmasked weighted mean back (``aggregate_fit``); every reply the workflow receives
  passes ``_Watch``, which refuses one that carries an array (an unmasked update);
- client side, ``secure_aggregation_mod`` (a train mod of the ClientApp) runs ``secaggplus_mod``
  on the protocol's messages and, in its "collect masked vectors" stage, turns the legacy
  ``fitins`` message into fedsea's plain TRAIN message, calls fedsea's ``train`` and answers
  the head/tail *update* (trained - start, in the order the server gave) as a ``fitres``, which
  ``secaggplus_mod`` quantizes, masks and sends as bytes only.

What is summed is the update ``delta_i = trained_i - start`` (the start is the global adapter
every client got); the ServerApp adds the secure weighted mean of the deltas to the start, which
equals FedAvg of the trained adapters (the weights sum to one). Deltas of one round are small
(Adam moves an element by about ``lr`` a step: 1e-2 x a few steps), so they can be clipped to a
narrow range and quantized finely:

- ``CLIPPING_RANGE = 1.0``: each element of ``w_i * delta_i`` (``w_i = n_i / max_weight <= 1``)
  is clipped to [-1, 1]; an element that moved by more than 1 in one round is clipped (a run
  that diverges, not a LoRA fine-tune);
- ``QUANTIZATION_RANGE = 2**22`` levels over [-c, c] (step ``2c / 2**22`` ~ 4.8e-7 for c = 1),
  stochastic rounding (Flower's);
- ``MODULUS_RANGE = 2**32``: the masked sums of up to 2**32 / 2**22 = 1024 clients a round
  cannot wrap;
- ``max_weight``: the most examples a client can train on in a round (``local_steps x`` the
  largest batch size of the run file), so ``w_i`` is at most 1 yet not needlessly small (a
  smaller ``w_i`` scales the update down before quantizing it, coarsening it). A client that
  reports more weakens the bound (Flower logs a warning).

Error bound (``error_bound``): each client's dequantized ``w_i delta_i`` is off by less than one
step ``2c/T``; the mean divides the sum by ``Q = sum q_i`` with ``q_i = round(T n_i / W)``, so
``|mean - FedAvg| <= 2 c n W / (T sum n_i)`` for the rounding of the values, plus at most the
same again for the rounding of the weights ``q_i`` (relative error ``W / (2 T n_i)`` of a weight
times ``|delta| <= c``), plus float32 rounding of the result (1e-6 allowed for values of
O(0.1)). Two clients of equal weight, c = 1: 4 x 2**-22 + 1e-6 ~ 2e-6 (measured: 4e-7).

Not applied in the secure path: fedsea's per-update checks of the head/tail (``max_update_rms``,
``clip_norm``), which need one client's update; the clipping range bounds each element instead.

The protocol needs at least two sampled clients and one cut ``(p, q)`` for all (it sums vectors
of equal shapes); it tolerates dropouts while every client keeps ``threshold`` live neighbours
(``NUM_SHARES``: all sampled clients are neighbours; ``RECONSTRUCTION_THRESHOLD``: half of them,
at least 2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

logger = logging.getLogger(__name__)

CLIPPING_RANGE = 1.0
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 0.5
KEYS_CONFIG = "secagg-keys"  # the order of the head/tail tensors in the fitins/fitres arrays


def error_bound(weights: Sequence[float], max_weight: float, clipping: float = CLIPPING_RANGE) -> float:
    """The largest difference, per element, between the secure mean and FedAvg (see the module docstring).

    Args:
        weights: the clients' ``num-examples``.
        max_weight: the protocol's ``max_weight``.
        clipping: the clipping range.
    """
    n, total = len(weights), float(sum(weights))
    values = 2 * clipping * n * max_weight / (QUANTIZATION_RANGE * total)
    return 2 * values + 1e-6  # + the weights' rounding (at most as much) + float32 rounding


def one_cut(cuts: dict[str, tuple[int, int]], round_number: int | None = None) -> tuple[int, int]:
    """The one (p, q) of the clients ``cuts`` (name -> cut, in round ``round_number`` if given); a
    ValueError naming two that differ."""
    first_name, first = next(iter(cuts.items()))
    when = f" in round {round_number}" if round_number is not None else ""
    for name, cut in cuts.items():
        if cut != first:
            raise ValueError(
                f"secure aggregation sums equally shaped head/tail adapters, so every client needs the same "
                f"cut (p, q){when}: {first_name} has {first}, {name} has {cut}; give all clients one cut (move "
                "them together: [client] cuts) or turn secure-aggregation off"
            )
    return first


def check_plan(plan: Any, strategy: str) -> None:
    """Refuse, before anything starts, a run secure aggregation cannot serve (a ValueError saying why).

    Args:
        plan: the fedsea run plan (its clients' cuts, its mode).
        strategy: the Flower strategy's name.
    """
    if plan.fed.mode != "hierarchical" or strategy != "fedavg":
        raise ValueError(
            "secure aggregation runs in mode hierarchical with the fedavg strategy (the server sees only the "
            f"clients' sum); got mode {plan.fed.mode} and strategy {strategy}"
        )
    if len(plan.clients) < 2:
        raise ValueError("secure aggregation needs at least two clients a round (one client's sum is its update)")
    for round_number in range(1, plan.fed.rounds + 1):  # a cut schedule may move them all, together
        one_cut({c.name: c.cut_at(round_number) for c in plan.clients}, round_number if round_number > 1 else None)


# -- client ---------------------------------------------------------------------------------------
def _from_fitins(msg: Message) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Make ``msg`` (the workflow's ``fitins`` content) fedsea's plain TRAIN message; its keys and start."""
    from flwr.compat.common import recorddict_compat as compat

    from fedsea.flower.records import to_record

    content = msg.content
    config = dict(content.config_records["fitins.config"])
    keys = str(config.pop(KEYS_CONFIG)).split("\n")
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(content.array_records["fitins.parameters"], True))
    start = {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in zip(keys, arrays, strict=True)}
    msg.content = RecordDict({"arrays": to_record(start), "config": ConfigRecord(config)})
    return keys, start


def _to_fitres(reply: Message, keys: list[str], start: dict[str, torch.Tensor]) -> Message:
    """fedsea's train reply as the legacy ``fitres`` ``secaggplus_mod`` masks: the update, in ``keys`` order."""
    from flwr.compat.common import recorddict_compat as compat

    from fedsea.flower.records import arrays_of, config_of, metrics_of, to_state

    trained = to_state(arrays_of(reply))
    if set(trained) != set(keys):
        raise ValueError(
            f"the client's head/tail ({len(trained)} tensors) is not the slice the server sent ({len(keys)}): "
            "secure aggregation needs one cut for all clients"
        )
    deltas = [(trained[k].float() - start[k]).numpy() for k in keys]  # shapes as the global's slice
    metrics = dict(metrics_of(reply))
    fit_metrics: dict[str, Any] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    fit_metrics["name"] = str(config_of(reply, "client")["name"])
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(deltas), int(fit_metrics["num-examples"]), fit_metrics)
    reply.content = compat.fitres_to_recorddict(fitres, keep_input=False)
    return reply


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """The ClientApp's train mod: Flower's ``secaggplus_mod`` on the SecAgg+ messages, a no-op on others."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    from flwr.client.mod import secaggplus_mod

    def train(inner: Message, context: Context) -> Message:  # the "collect masked vectors" stage only
        keys, start = _from_fitins(inner)
        reply = call_next(inner, context)
        return reply if reply.has_error() else _to_fitres(reply, keys, start)

    return secaggplus_mod(msg, ctxt, train)


# -- server ---------------------------------------------------------------------------------------
@dataclass
class SecureResult:
    """What a secure round gave the ServerApp: the weighted mean update and each client's metrics."""

    mean: dict[str, torch.Tensor] | None = None  # None: the protocol halted (too few clients left)
    arrays: list[Any] | None = None  # the mean as the workflow gave it (float64 arrays, in ``keys`` order)
    clients: list[dict[str, Any]] = field(default_factory=list)  # name, num-examples, loss, ... (no arrays)
    replies: int = 0  # the protocol's replies the ServerApp received (all checked to carry no array)
    failures: int = 0


class _Watch:
    """A grid that refuses a reply carrying an array: the ServerApp receives masked vectors (bytes) only."""

    def __init__(self, grid: Any, result: SecureResult) -> None:
        self.grid, self.result = grid, result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                continue
            held = sum(len(r) for r in reply.content.array_records.values())
            if held:
                raise RuntimeError(
                    f"node {reply.metadata.src_node_id} answered a secure-aggregation stage with {held} unmasked "
                    "arrays: is its ClientApp's train mod fedsea.flower.secagg.secure_aggregation_mod?"
                )
            masked = reply.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS)
            if masked is not None and not isinstance(masked, list):
                raise RuntimeError(f"node {reply.metadata.src_node_id}: masked parameters are not a list of bytes")
            self.result.replies += 1
        return replies


def _strategy(fitins: dict[int, FitIns], grid: Any, run_id: int, result: SecureResult) -> Any:
    """A legacy strategy that samples nothing: it hands the workflow fedsea's messages and keeps the mean."""
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import Strategy

    class _Round(Strategy):
        def initialize_parameters(self, client_manager: Any) -> Parameters | None:
            return None

        def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> Any:
            return [(GridClientProxy(node, grid, run_id), ins) for node, ins in fitins.items()]

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            # Every FitRes carries the same (unmasked) mean now; the metrics are each client's own.
            result.failures = len(failures)
            if not results:
                return None, {}
            result.arrays = parameters_to_ndarrays(results[0][1].parameters)
            result.clients = [{**r.metrics, "num-examples": r.num_examples} for _, r in results]
            return results[0][1].parameters, {}

        def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> Any:
            return []

        def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
            return None, {}

        def evaluate(self, server_round: int, parameters: Parameters) -> Any:
            return None

    return _Round()


def secure_train(
    grid: Any, messages: list[Message], keys: list[str], round_number: int, max_weight: float, timeout: float
) -> SecureResult:
    """Run one SecAgg+ round over fedsea's TRAIN ``messages``; the weighted mean of the head/tail updates.

    Args:
        grid: the ServerApp's grid.
        messages: fedsea's plain TRAIN messages (``arrays``: the node's head/tail slice; ``config``).
        keys: the head/tail tensors' names, the same for every node (one cut).
        round_number: the server round (the messages' group).
        max_weight: the most ``num-examples`` a client may report (its weight is ``n / max_weight``).
        timeout: seconds to wait at each of the protocol's four stages.
    """
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    from fedsea.flower.records import arrays_of, config_of, to_state

    result = SecureResult()
    fitins: dict[int, FitIns] = {}
    for msg in messages:
        start = to_state(arrays_of(msg))
        config: dict[str, Any] = {**config_of(msg), KEYS_CONFIG: "\n".join(keys)}
        arrays = [start[k].numpy() for k in keys]
        fitins[msg.metadata.dst_node_id] = FitIns(ndarrays_to_parameters(arrays), config)
    run_id = int(grid.run.run_id) if hasattr(grid, "run") else 0
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: round_number}),
            MAIN_PARAMS_RECORD: compat.parameters_to_arrayrecord(Parameters([], ""), True),
        }
    )
    base = Context(run_id=run_id, node_id=0, node_config={}, state=state, run_config={})
    context = LegacyContext(base, strategy=_strategy(fitins, grid, run_id, result))
    workflow = SecAggPlusWorkflow(
        NUM_SHARES, RECONSTRUCTION_THRESHOLD, max_weight=max_weight, clipping_range=CLIPPING_RANGE,
        quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE, timeout=timeout,
    )  # fmt: skip
    workflow(_Watch(grid, result), context)  # type: ignore[arg-type]
    if result.arrays is not None:
        result.mean = {
            k: torch.from_numpy(np.asarray(a, dtype=np.float32)) for k, a in zip(keys, result.arrays, strict=True)
        }
    return result


def trunk_mean(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of the trunk adapters (the ServerApp sees them: the trunk server computed them)."""
    total = float(sum(weights))
    keys = set.intersection(*(set(s) for s in states)) if states else set()
    return {k: sum(w / total * s[k].double() for s, w in zip(states, weights, strict=True)).float() for k in keys}  # type: ignore[union-attr]


def play_secure(
    rounds: Any, templates: list[Message], state: dict[str, torch.Tensor], key: str, round_number: int
) -> tuple[dict[str, torch.Tensor] | None, list[dict[str, Any]], dict[str, Any]]:
    """The secure path of ``FlowerRounds.play`` (hierarchical mode, one cut, FedAvg).

    Stages ``state`` on the trunk server, runs SecAgg+ over the sampled nodes' TRAIN messages,
    collects the trunk adapters of the clients the protocol counted, and returns the new global
    state (None: the protocol halted, the global stays), the clients' metrics and the round's
    ``secure-aggregation`` record. The head/tail part is ``start + secure weighted mean of the
    updates``; the trunk part is the weighted mean of the collected trunk adapters.
    """
    from fedsea.flower.records import head_tail_slice

    plan, fed = rounds.plan, rounds.fed
    p, q = one_cut({info.name: info.cut(round_number) for info in rounds.nodes.values()}, round_number)
    keys = sorted(head_tail_slice(state, rounds.num_layers, p, q))
    messages = [rounds.message(t, state, key, round_number) for t in templates]
    max_weight = float(fed.local_steps * max(c.batch_size for c in plan.clients))
    rounds.operator.stage(key, state)
    result = secure_train(rounds.grid, messages, keys, round_number, max_weight, fed.round_timeout_s)
    names = [str(c["name"]) for c in result.clients]
    trunks = rounds.operator.collect(key, names, drop=True)
    weights = [float(c["num-examples"]) for c in result.clients]
    record = {
        "clipping-range": CLIPPING_RANGE,
        "quantization-range": QUANTIZATION_RANGE,
        "max-weight": max_weight,
        "replies": result.replies,
        "failures": result.failures,
        "error-bound": error_bound(weights, max_weight) if weights else None,
    }
    if result.mean is None:
        return None, result.clients, record
    missing = [n for n in names if n not in trunks]
    if missing:  # their head/tail is in the sum already; the trunk mean is over the others
        logger.warning("round %d: no trunk adapter from %s; the trunk mean is over the others", round_number, missing)
    new_state = dict(state)
    new_state.update({k: (state[k].float() + result.mean[k]).to(state[k].dtype) for k in keys})
    have = [(trunks[n], w) for n, w in zip(names, weights, strict=True) if n in trunks]
    if have:
        mean = trunk_mean([s for s, _ in have], [w for _, w in have])
        new_state.update({k: v.to(state[k].dtype) for k, v in mean.items() if k in state and k not in keys})
    return new_state, result.clients, record
