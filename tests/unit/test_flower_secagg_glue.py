"""The SecAgg+ glue in process: Flower's workflow (server) and ``secaggplus_mod`` (client) through
fedsea's adapters, over an in-memory stand-in for Flower's grid that delivers each message to the
node's mod. The clients' updates are known here, so the secure mean is checked against the plain
weighted mean, and every reply the server receives is checked to carry no array."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedsea.flower.records import arrays_of, to_record, to_state
from fedsea.flower.secagg import CLIPPING_RANGE, error_bound, one_cut, secure_aggregation_mod, secure_train

KEYS = ["layers.0.q_proj.lora_A.weight", "layers.0.q_proj.lora_B.weight", "layers.3.v_proj.lora_A.weight"]
SHAPES = [(4, 16), (16, 4), (4, 16)]


@pytest.fixture(autouse=True)
def task_identity():
    """What Flower's runtime sets in a ServerApp/ClientApp process (messages take their run from it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class MemoryGrid:
    """Delivers messages to each node's ClientApp train function (mod + train), keeps what came back."""

    def __init__(self, train, mod=secure_aggregation_mod, lost: int | None = None) -> None:
        self.train, self.mod, self.lost = train, mod, lost  # lost: a node whose training reply never comes
        self.contexts: dict[int, Context] = {}
        self.received: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg = copy.deepcopy(msg)  # as on the wire: the workflow shares one content among its messages
            node = msg.metadata.dst_node_id
            ctx = self.contexts.setdefault(node, Context(node, node, {}, RecordDict(), {}))
            if node == self.lost and "fitins.parameters" in msg.content.array_records:
                continue  # it went away while training: the server times out on it
            replies.append(self.mod(msg, ctx, self.train) if self.mod else self.train(msg, ctx))
        self.received += replies
        return replies


def _round(weights: dict[int, int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    start = {k: torch.randn(s, generator=gen) * 0.1 for k, s in zip(KEYS, SHAPES, strict=True)}  # O(0.1) adapters
    # Each node's head/tail after training: the start plus a one-round update of ~1e-2.
    trained = {n: {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in start.items()} for n in weights}

    def train(msg: Message, ctx: Context) -> Message:  # what fedsea's train answers: arrays, metrics, name
        got = to_state(arrays_of(msg))
        assert all(torch.equal(got[k], start[k]) for k in KEYS)  # the node got its start intact
        node = msg.metadata.dst_node_id
        content = RecordDict(
            {
                "arrays": to_record(trained[node]),
                "metrics": MetricRecord({"num-examples": weights[node], "loss": 1.0}),
                "client": ConfigRecord({"name": f"client-{node}"}),
            }
        )
        return Message(content, reply_to=msg)

    messages = [
        Message(
            RecordDict({"arrays": to_record(start), "config": ConfigRecord({"server-round": 1, "stage-key": "k"})}),
            dst_node_id=n,
            message_type=MessageType.TRAIN,
        )
        for n in weights
    ]
    total = sum(weights.values())
    fedavg = {k: sum(weights[n] / total * trained[n][k].double() for n in weights).float() for k in KEYS}
    return start, trained, fedavg, train, messages


@pytest.mark.parametrize("weights", [{11: 12, 22: 12}, {11: 3, 22: 12, 33: 7, 44: 12}])
def test_the_secure_mean_is_fedavg_and_the_server_sees_masked_vectors_only(weights):
    start, trained, fedavg, train, messages = _round(weights)
    grid = MemoryGrid(train)
    max_weight = 12.0
    result = secure_train(grid, messages, KEYS, 1, max_weight, timeout=10.0)
    assert result.mean is not None and result.failures == 0
    assert sorted(c["name"] for c in result.clients) == sorted(f"client-{n}" for n in weights)
    bound = error_bound(list(weights.values()), max_weight)
    for k in KEYS:
        secure = start[k] + result.mean[k]
        err = (secure - fedavg[k]).abs().max().item()
        assert err <= bound, (k, err, bound)
    # The replies the server got: four stages per node, none with an array; the masked vectors are
    # integers mod 2**32 that are not the node's update.
    assert result.replies == 4 * len(weights) == len(grid.received)
    assert all(sum(len(r) for r in m.content.array_records.values()) == 0 for m in grid.received)
    masked = [m for m in grid.received if Key.MASKED_PARAMETERS in m.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == len(weights)
    for m in masked:
        from flwr.common import bytes_to_ndarray

        vec = [bytes_to_ndarray(b) for b in m.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        node = m.metadata.src_node_id
        update = (trained[node][KEYS[0]] - start[KEYS[0]]).numpy()
        assert vec[1].shape == update.shape and not np.allclose(vec[1], update, atol=1.0)  # [0]: the weight factor


def test_a_client_lost_while_training_leaves_the_mean_of_the_others():
    # Three clients (threshold 2 of 3 shares): the lost one's pairwise masks are rebuilt from its
    # neighbours' shares of its key, and the mean is over the two that answered.
    weights = {11: 12, 22: 12, 33: 6}
    start, trained, _, train, messages = _round(weights, seed=1)
    result = secure_train(MemoryGrid(train, lost=22), messages, KEYS, 1, 12.0, timeout=10.0)
    assert result.mean is not None
    assert sorted(c["name"] for c in result.clients) == ["client-11", "client-33"]
    alive = {11: 12, 33: 6}
    for k in KEYS:
        expected = sum(w / 18 * trained[n][k].double() for n, w in alive.items()).float()
        err = (start[k] + result.mean[k] - expected).abs().max().item()
        assert err <= error_bound(list(alive.values()), 12.0), (k, err)


def test_a_client_without_the_mod_is_refused_before_its_update_is_read():
    start, _, _, _, messages = _round({11: 12, 22: 12})

    def plain(msg: Message, ctx: Context) -> Message:  # an old ClientApp: echoes arrays, no protocol
        return Message(RecordDict({"arrays": ArrayRecord(), "x": to_record(start)}), reply_to=msg)

    with pytest.raises(RuntimeError, match="unmasked"):
        secure_train(MemoryGrid(plain, mod=None), messages, KEYS, 1, 12.0, timeout=10.0)


def test_one_cut_names_both_cuts():
    assert one_cut({"a": (1, 1), "b": (1, 1)}) == (1, 1)
    with pytest.raises(ValueError, match=r"client-0 has \(1, 1\), client-1 has \(2, 1\)"):
        one_cut({"client-0": (1, 1), "client-1": (2, 1)})


def test_the_bound_is_a_few_quantization_steps():
    # Two equal clients: values within one step 2c/T of the mean, weights rounded exactly.
    assert error_bound([12, 12], 12.0) == pytest.approx(4 * CLIPPING_RANGE / 2**22 + 1e-6)


def test_the_run_config_key_and_the_plan_checks():
    from fedsea.flower.secagg import check_plan
    from fedsea.flower.settings import FlowerRun
    from fedsea.flower.template import DEFAULT_CONFIG, pyproject

    assert FlowerRun.from_config({"secure-aggregation": True}).secure_aggregation
    assert not FlowerRun.from_config({}).secure_aggregation
    assert '"secure-aggregation" = false' in pyproject(DEFAULT_CONFIG)  # flwr run overrides only declared keys
    plan = FlowerRun(overrides=("federation.clients=2", "federation.mode=hierarchical")).plan()
    check_plan(plan, "fedavg")
    with pytest.raises(ValueError, match="fedavg strategy"):
        check_plan(plan, "fedmedian")
    with pytest.raises(ValueError, match="mode hierarchical"):
        check_plan(FlowerRun(overrides=("federation.clients=2", "federation.mode=sequential")).plan(), "fedavg")
    with pytest.raises(ValueError, match="at least two clients"):
        check_plan(FlowerRun(overrides=("federation.clients=1", "federation.mode=hierarchical")).plan(), "fedavg")
