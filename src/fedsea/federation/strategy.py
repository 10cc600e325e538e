"""Aggregation strategies: pure functions of the clients' updates, no network, no mutation.

The global adapter of a run is one set of LoRA tensors per block, keyed by global layer
number (``layers.3.self_attn.q_proj.lora_A.weight``), whoever holds the block: a client's
head or tail, or a trunk adapter on the server. An update carries the tensors its party
trained and a weight (its number of samples); the average of each key runs over the updates
that hold it, so clients with different partition points average what they actually share.

Robust aggregation (for runs with parties that may send bad updates):

- ``clip_norm`` (any strategy): each update's change from the current global state, all its
  tensors together, is scaled down to at most this L2 norm before it is combined (norm bounding,
  Sun et al. 2019), so one party moves the average by at most ``weight share * clip_norm``;
- ``median``: the coordinate-wise median of the updates holding each key (Yin et al. 2018),
  unweighted: the mean of the two middle values for an even count;
- ``trimmed-mean``: per coordinate, the ``trim_fraction`` largest and smallest values are
  dropped and the rest averaged, unweighted (Yin et al. 2018).

Median and trimmed mean ignore the sample weights on purpose: a weight is what the client
declares, so weighting by it would let one party claim a majority. ``fedavg`` stays the
sample-weighted mean.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedsea.federation.validation import DEFAULT_MAX_UPDATE_RMS


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
    """Chooses who trains in a round and merges their updates into the next global state.

    Args:
        fraction: share of the clients sampled per round.
        min_clients: at least this many are sampled.
        clip_norm: clip each update's change from the current state to this L2 norm (over all
            its tensors) before combining; ``None``: no clipping.
        trim_fraction: the share of values cut at each end per coordinate (``trimmed-mean`` only).
        max_update_rms: the bound the coordinator checks every update against before it gets here
            (``fedsea.federation.validation``); ``None``: no bound.
    """

    def __init__(
        self,
        fraction: float = 1.0,
        min_clients: int = 1,
        clip_norm: float | None = None,
        trim_fraction: float = 0.1,
        max_update_rms: float | None = DEFAULT_MAX_UPDATE_RMS,
    ) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        if clip_norm is not None and not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"clip_norm must be a finite number > 0 or unset, got {clip_norm}")
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        if max_update_rms is not None and not max_update_rms > 0:
            raise ValueError(f"max_update_rms must be > 0 or unset, got {max_update_rms}")
        self.fraction = fraction
        self.min_clients = min_clients
        self.clip_norm = clip_norm
        self.trim_fraction = trim_fraction
        self.max_update_rms = max_update_rms

    def select(self, clients: Sequence[str], round_number: int, seed: int) -> list[str]:
        """A seeded sample of ``fraction`` of the clients (at least ``min_clients``, at most all)."""
        pool = sorted(clients)
        count = min(len(pool), max(self.min_clients, round(self.fraction * len(pool))))
        return sorted(random.Random(f"{seed}:{round_number}").sample(pool, count))

    def aggregate(self, updates: Sequence[Update], current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The next global state (``clip_norm`` applied, then ``combine``); ``current`` when there are none."""
        if not updates:
            return dict(current)
        if self.clip_norm is not None:
            updates = [clip_update(u, current, self.clip_norm) for u in updates]
        return self.combine(updates, current)

    @abstractmethod
    def combine(self, updates: Sequence[Update], current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The next global state from one or more updates; keys nobody updated keep their ``current`` value."""


def clip_update(update: Update, current: Mapping[str, torch.Tensor], clip_norm: float) -> Update:
    """``update`` with its change from ``current`` scaled to an L2 norm of at most ``clip_norm``.

    The norm runs over all the update's tensors together (keys ``current`` lacks count as a change
    from zero); an update within the bound is returned as it is.
    """
    deltas = {
        k: v.to(torch.float64) - (current[k].to(torch.float64) if k in current else 0.0)
        for k, v in update.state.items()
    }
    norm = math.sqrt(sum(float(d.square().sum()) for d in deltas.values()))
    if norm <= clip_norm:
        return update
    scale = clip_norm / norm
    state = {
        k: ((current[k].to(torch.float64) if k in current else 0.0) + d * scale).to(update.state[k].dtype)
        for k, d in deltas.items()
    }
    return Update(update.party, update.weight, state, update.metrics)


def _stacked(updates: Sequence[Update]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each key with the (n, *shape) float64 stack of the values of the n updates holding it."""
    for key in sorted({k for u in updates for k in u.state}):
        values = [u.state[key] for u in updates if key in u.state]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(f"{key}: the updates hold shapes {sorted(shapes)}")
        yield key, torch.stack([v.to(torch.float64) for v in values])


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

    def combine(self, updates: Sequence[Update], current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sample-weighted mean of ``updates``."""
        return weighted_mean(updates, current)


class Median(Strategy):
    """Coordinate-wise median (Yin et al. 2018): robust to fewer than half the updates being bad."""

    def combine(self, updates: Sequence[Update], current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per coordinate, the middle value (the mean of the two middle ones for an even count)."""
        result = {k: v.clone() for k, v in current.items()}
        for key, stack in _stacked(updates):
            ordered = stack.sort(dim=0).values  # (n, *shape)
            n = ordered.shape[0]
            middle = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
            result[key] = middle.to(current[key].dtype if key in current else updates[0].state[key].dtype)
        return result


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018): ``trim_fraction`` of the values cut at each end."""

    def combine(self, updates: Sequence[Update], current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per coordinate, the mean of the values left after cutting floor(trim_fraction * n) at each end."""
        result = {k: v.clone() for k, v in current.items()}
        for key, stack in _stacked(updates):
            n = stack.shape[0]
            cut = min(math.floor(self.trim_fraction * n), (n - 1) // 2)  # keep at least one value
            kept = stack.sort(dim=0).values[cut : n - cut]  # (n - 2 cut, *shape)
            result[key] = kept.mean(dim=0).to(current[key].dtype if key in current else stack.dtype)
        return result


STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg, "median": Median, "trimmed-mean": TrimmedMean}


def make_strategy(
    name: str,
    fraction: float = 1.0,
    min_clients: int = 1,
    clip_norm: float | None = None,
    trim_fraction: float = 0.1,
    max_update_rms: float | None = DEFAULT_MAX_UPDATE_RMS,
) -> Strategy:
    """The aggregation strategy registered as ``name`` (case-insensitive); ``ValueError`` if unknown."""
    try:
        cls = STRATEGIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None
    return cls(fraction, min_clients, clip_norm, trim_fraction, max_update_rms)
