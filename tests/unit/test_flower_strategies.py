"""fedsea's Flower strategies: FedProx needs its mu, FedAdam's moments survive a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsea.federation.checkpoint import load_round, save_round
from fedsea.federation.simconfig import load_plan
from fedsea.flower.rounds import FlowerRounds
from fedsea.flower.strategies import SERVER_STATE_NAME, FedAdam64, FedProx64, make_strategy


def test_fedprox_is_selectable_and_refused_without_its_mu():
    plan = load_plan(None, ["optim.proximal_mu=0.01"])
    assert plan.optim.proximal_mu == 0.01
    strategy = make_strategy("fedprox", plan.fed)
    assert isinstance(strategy, FedProx64)
    FlowerRounds(plan, None, None, "", 6, strategy, None, "run")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="proximal_mu"):
        FlowerRounds(load_plan(None), None, None, "", 6, strategy, None, "run")  # type: ignore[arg-type]


def _record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(v) for k, v in state.items()})


def _reply(state: dict[str, np.ndarray], examples: int) -> Message:
    content = RecordDict({"arrays": _record(state), "metrics": MetricRecord({"num-examples": examples})})
    return Message(content, dst_node_id=0, message_type="train")


def test_fedadam_moments_go_through_a_round_checkpoint_bit_for_bit(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):  # what a ServerApp's process has (Messages need it)
        monkeypatch.setattr(TaskIdentity, name, 1)
    gen = np.random.default_rng(0)
    start = {"layers.0.a": gen.standard_normal((4, 3)).astype(np.float32), "layers.1.b": np.zeros(5, np.float32)}
    strategy = make_strategy("fedadam", load_plan(None).fed)
    assert isinstance(strategy, FedAdam64) and strategy.state_dict() is None  # no moments before a round
    strategy.configure_train(1, _record(start), ConfigRecord(), _Grid())
    replies = [_reply({k: v + gen.standard_normal(v.shape).astype(np.float32) for k, v in start.items()}, n)
               for n in (3, 5)]  # fmt: skip
    strategy.aggregate_train(1, replies)
    saved = strategy.state_dict()
    assert saved is not None
    save_round(tmp_path, 1, {"x": torch.zeros(1)}, {SERVER_STATE_NAME: saved})
    restored = make_strategy("fedadam", load_plan(None).fed)
    restored.load_state_dict(load_round(tmp_path / "checkpoints" / "round-0001")[2][SERVER_STATE_NAME])
    for k in start:
        assert np.array_equal(restored.m_t[k], strategy.m_t[k]) and np.array_equal(restored.v_t[k], strategy.v_t[k])
        assert restored.m_t[k].dtype == np.float32 and np.abs(restored.m_t[k]).sum() > 0


class _Grid:
    """The one thing FedAvg's ``configure_train`` asks a grid: the node ids."""

    def get_node_ids(self) -> list[int]:
        return [0]
