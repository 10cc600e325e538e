"""Aggregation strategies: pure functions of the clients' updates, no network, no mutation.

The global adapter of a run is one set of LoRA tensors per block, keyed by global layer
number (``layers.3.self_attn.q_proj.lora_A.weight``), whoever holds the block: a client's
head or tail, or a trunk adapter on the server. An update carries the tensors its party
trained and a weight (its number of samples); the average of each key runs over the updates
that hold it, so clients with different partition points average what they actually share.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Update:
    """One party's trained tensors for a round.

    Attributes:
        party: who trained them (``client-a``, or ``trunk:client-a`` for its trunk adapter).
        weight: the number of samples behind them (FedAvg's weight).
        state: adapter tensors by global key.
        metrics: anything to log (loss, steps).
    """

    party: str
    weight: float
    state: Mapping[str, torch.Tensor]
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"update weight must be > 0, got {self.weight} from {self.party}")


class Strategy(ABC):
    """Chooses who trains in a round and merges their updates into the next global state."""

    def __init__(self, fraction: float = 1.0, min_clients: int = 1) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        self.fraction = fraction
        self.min_clients = min_clients

    def select(self, clients: Sequence[str], round_number: int, seed: int) -> list[str]:
        """A seeded sample of ``fraction`` of the clients (at least ``min_clients``, at most all)."""
        pool = sorted(clients)
        count = min(len(pool), max(self.min_clients, round(self.fraction * len(pool))))
        return sorted(random.Random(f"{seed}:{round_number}").sample(pool, count))

    @abstractmethod
    def aggregate(self, updates: Sequence[Update], current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The next global state; keys nobody updated keep their ``current`` value."""


def weighted_mean(updates: Sequence[Update], current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key-wise mean of the updates holding each key, weighted by ``Update.weight``.

    Accumulates in float64 so that the order of the updates does not change the result
    beyond the final rounding.
    """
    result = {k: v.clone() for k, v in current.items()}
    keys = sorted({k for u in updates for k in u.state})
    for key in keys:
        holders = [u for u in updates if key in u.state]
        total = sum(u.weight for u in holders)
        ref = holders[0].state[key]
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for u in holders:
            value = u.state[key]
            if value.shape != ref.shape:
                raise ValueError(f"{key}: {u.party} sent shape {tuple(value.shape)}, others {tuple(ref.shape)}")
            acc += value.to(torch.float64) * (u.weight / total)
        dtype = current[key].dtype if key in current else ref.dtype
        result[key] = acc.to(dtype)
    return result


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017): the sample-weighted mean of the updates."""

    def aggregate(self, updates: Sequence[Update], current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sample-weighted mean of ``updates``; ``current`` unchanged when there are none."""
        if not updates:
            return dict(current)
        return weighted_mean(updates, current)


STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg}


def make_strategy(name: str, fraction: float = 1.0, min_clients: int = 1) -> Strategy:
    """The aggregation strategy registered as ``name`` (case-insensitive); ``ValueError`` if unknown."""
    try:
        cls = STRATEGIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None
    return cls(fraction=fraction, min_clients=min_clients)
