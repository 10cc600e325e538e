"""FedProx (``[optim] proximal_mu``): the proximal term mu/2 ||w - w_0||^2 pulls every part's LoRA
back to the round's start, the head and tail in the client's optimizer and the trunk in the
server's (mu travels with the session's optimizer settings). A real server on loopback, the tiny
model: the same steps from the same start move each part far less with a large mu."""

from __future__ import annotations

import pytest
import torch

import fedsea
from fedsea.model.adapters import adapter_state_dict
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.convert import optim_from_pb, optim_to_pb
from tests.integration.conftest import tiny_batch, tiny_split


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k] - b[k]).square().sum()) for k in a) ** 0.5


def _moves(address: str, tokenizer, mu: float, steps: int = 6) -> dict[str, float]:
    """How far head, tail and trunk LoRA move from their start in ``steps`` steps with ``mu``."""
    optim = fedsea.OptimConfig(lr=1e-2, weight_decay=0.0, proximal_mu=mu)
    client = fedsea.SplitClient(address, tiny_split(1, 1), optim=optim)
    with client:
        start = {
            "head": adapter_state_dict(client.split.head),
            "tail": adapter_state_dict(client.split.tail),
            "trunk": client.trunk_adapter(),
        }
        batch = tiny_batch(tokenizer)
        for _ in range(steps):
            client.train_step(batch)
        end = {
            "head": adapter_state_dict(client.split.head),
            "tail": adapter_state_dict(client.split.tail),
            "trunk": client.trunk_adapter(),
        }
    return {part: _distance(end[part], start[part]) for part in start}


def test_the_proximal_term_holds_head_tail_and_trunk_near_the_rounds_start(server, tiny_tokenizer):
    free = _moves(server, tiny_tokenizer, 0.0)
    held = _moves(server, tiny_tokenizer, 1000.0)
    for part in ("head", "tail", "trunk"):
        assert free[part] > 0.02, (part, free)  # the steps do move it (the check can fail)
        assert held[part] < 0.4 * free[part], (part, free[part], held[part])


def test_proximal_mu_travels_in_the_sessions_optimizer_settings_and_is_checked():
    assert optim_from_pb(optim_to_pb(fedsea.OptimConfig(proximal_mu=0.01))).proximal_mu == 0.01
    with pytest.raises(ValueError, match="proximal_mu"):
        optim_from_pb(pb.OptimizerConfig(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, proximal_mu=-1.0))
