"""FedAvg arithmetic, worked out by hand."""

from __future__ import annotations

import pytest
import torch

from fedsea.federation.strategy import FedAvg, Update, weighted_mean


def test_weighted_mean_by_samples():
    current = {"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.full((2,), 7.0)}
    updates = [
        Update("x", 1, {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 3.0])}),
        Update("y", 3, {"a": torch.tensor([5.0, 6.0])}),
    ]
    out = FedAvg().aggregate(updates, current)
    # a: (1*[1,2] + 3*[5,6]) / 4 = [4, 5]; b: only x holds it; c: nobody, unchanged.
    assert torch.allclose(out["a"], torch.tensor([4.0, 5.0]))
    assert torch.equal(out["b"], torch.tensor([3.0, 3.0]))
    assert torch.equal(out["c"], torch.full((2,), 7.0))
    assert torch.equal(current["a"], torch.zeros(2)), "inputs are not mutated"


def test_order_of_updates_does_not_matter():
    gen = torch.Generator().manual_seed(0)
    updates = [Update(str(i), float(i + 1), {"w": torch.randn(5, 5, generator=gen)}) for i in range(4)]
    a = weighted_mean(updates, {})
    b = weighted_mean(list(reversed(updates)), {})
    assert torch.equal(a["w"], b["w"])


def test_errors_and_selection():
    with pytest.raises(ValueError, match="weight must be > 0"):
        Update("x", 0, {})
    with pytest.raises(ValueError, match="shape"):
        weighted_mean([Update("x", 1, {"w": torch.zeros(2)}), Update("y", 1, {"w": torch.zeros(3)})], {})
    strategy = FedAvg(fraction=0.5, min_clients=1)
    clients = [f"c{i}" for i in range(6)]
    picked = strategy.select(clients, round_number=1, seed=0)
    assert len(picked) == 3 and picked == strategy.select(list(reversed(clients)), 1, 0)
    assert strategy.select(clients, 2, 0) != picked or strategy.select(clients, 3, 0) != picked
    assert FedAvg().aggregate([], {"w": torch.ones(1)})["w"].item() == 1.0
    with pytest.raises(ValueError, match="fraction"):
        FedAvg(fraction=0)
