"""Flower's own strategies for fedsea's rounds, configured from the run file's federation settings.

Two things differ from Flower's stock strategies, both so that a Flower run and a native run of
the same run file agree (tests/integration/test_flower_engines.py):

- **Sampling is fedsea's.** ``FlowerRounds`` samples the round's clients with the native
  coordinator's seeded ``Strategy.select`` (the run's ``seed``, the round number, the client
  names) and hands the strategy only those nodes, so the strategies are built with
  ``fraction_train = 1``. Flower's own sampling draws from Python's global, unseeded ``random``.
- **FedAvg's weighted mean is accumulated in float64** (``fedsea.federation.strategy.weighted_mean``,
  the native engine's), where Flower accumulates in the arrays' float32: with weights like 1/3 the
  two would differ in the last bit. FedAdam builds on the same mean (``FedAvg64`` sits under it).

FedAdam keeps server state across rounds (its moments m_t and v_t, one array per adapter tensor);
``state_dict`` / ``load_state_dict`` let ``FlowerRounds`` checkpoint it with each round, so a
resumed run continues the same optimisation.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedTrimmedAvg

from fedsea.federation.config import FedConfig
from fedsea.federation.strategy import Update, weighted_mean
from fedsea.flower.records import arrays_of, metrics_of, scalar, to_state

# The strategies whose server state ``FlowerRounds`` checkpoints (the name of its file in the round folder).
SERVER_STATE_NAME = "strategy"


class FedAvg64(FedAvg):
    """Flower's FedAvg with the sample-weighted mean accumulated in float64 (the native engine's)."""

    name = "fedavg"  # the strategy's name in fedsea (``--strategy``): what the checks compare

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The weighted mean of the replies' ``arrays`` (weights: their ``num-examples`` metric), in reply order."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        key, weight = self.arrayrecord_key, self.weighted_by_key
        updates = [
            Update(str(i), float(scalar(metrics_of(m), weight)), to_state(arrays_of(m, key)))
            for i, m in enumerate(valid)
        ]
        mean = weighted_mean(updates, {})  # float64 sums, cast back to the updates' float32
        arrays = ArrayRecord({k: Array(v.numpy()) for k, v in mean.items()})
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return arrays, metrics


class FedAdam64(FedAdam, FedAvg64):
    """Flower's FedAdam (Reddi et al. 2021) on the float64 mean, with its moments checkpointable.

    Method resolution: FedAdam -> FedOpt -> FedAvg64 -> FedAvg, so FedAdam's server step runs on
    ``FedAvg64.aggregate_train``'s mean.
    """

    name = "fedadam"

    def state_dict(self) -> dict[str, Any] | None:
        """The moments as a torch-optimizer-like state dict (what ``save_round`` flattens into
        safetensors); None before the first aggregation.

        ``state``: index -> {"m": m_t, "v": v_t (float32 tensors of the adapter tensor's shape),
        "key": the adapter tensor's name}; ``param_groups``: the hyper-parameters, checked on load.
        """
        if not self.m_t or not self.v_t:
            return None
        state = {
            i: {"m": torch.from_numpy(np.array(self.m_t[k])), "v": torch.from_numpy(np.array(self.v_t[k])), "key": k}
            for i, k in enumerate(sorted(self.m_t))
        }
        return {"state": state, "param_groups": [self._hyper()]}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore the moments ``state_dict`` gave (a ``ValueError`` if the hyper-parameters differ)."""
        groups = saved.get("param_groups") or [{}]
        if groups[0] != self._hyper():
            raise ValueError(f"the checkpoint's FedAdam settings {groups[0]} differ from this run's {self._hyper()}")
        slots = saved["state"].values()
        self.m_t = {str(s["key"]): s["m"].numpy().copy() for s in slots}
        self.v_t = {str(s["key"]): s["v"].numpy().copy() for s in slots}

    def _hyper(self) -> dict[str, float]:
        return {"eta": self.eta, "eta_l": self.eta_l, "beta_1": self.beta_1, "beta_2": self.beta_2, "tau": self.tau}


class FedProx64(FedAvg64):
    """FedProx (Li et al. 2020) on the server: FedAvg's mean (float64), nothing more.

    The proximal term ``mu/2 ||w - w_global||^2`` is the parties' local training's, from the run
    file's ``[optim] proximal_mu`` (``OptimConfig``): the clients' head and tail optimizers and, sent
    with the session's optimizer settings, the trunk server's. ``FlowerRounds`` refuses this
    strategy with ``proximal_mu = 0`` (it would be plain FedAvg under another name). The same
    run file on the native engine with ``strategy = "fedavg"`` trains the same way.
    """

    name = "fedprox"


def make_strategy(name: str, fed: FedConfig) -> Any:
    """The Flower strategy ``name`` for the run: it trains every node ``FlowerRounds`` hands it.

    Sampling (``fraction`` of the clients, at least ``min_clients``, seeded by ``seed``) is done by
    ``FlowerRounds`` with the native engine's ``Strategy.select``, so the strategy's own fraction is 1.
    The wait for ``expected_clients`` is fedsea's (``FlowerRounds.discover``, bounded by
    ``join_timeout_s``): Flower's ``min_available_nodes`` would wait for them without end.

    Flower's strategies aggregate whole records, so fedsea's per-update checks (``max_update_rms``,
    ``clip_norm``) run before them (``fedsea.flower.rounds``); no client evaluation round is run
    (fedsea evaluates the global adapter itself). ``median`` and ``trimmed-mean`` are Flower's
    (numpy, float32), not bit-identical to the native engine's float64 ones.
    """
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 0,
        "min_available_nodes": 1,
    }
    if name == "fedavg":
        return FedAvg64(**common)
    if name == "fedprox":
        return FedProx64(**common)
    if name == "fedadam":
        # Server-side Adam on the averaged change (Reddi et al. 2021); LoRA deltas per round are
        # ~1e-3, so a server rate of 1e-2 keeps steps of that size.
        return FedAdam64(**common, eta=1e-2, eta_l=1e-3, tau=1e-6)
    if name == "median":
        return _named(FedMedian(**common), name)
    if name == "trimmed-mean":
        return _named(FedTrimmedAvg(**common, beta=fed.trim_fraction), name)
    raise ValueError(f"unknown Flower strategy {name!r}")


def _named(strategy: Any, name: str) -> Any:
    """``strategy`` with fedsea's ``name`` for it (as ``FedAvg64.name``)."""
    strategy.name = name
    return strategy


def strategy_name(strategy: Any) -> str:
    """fedsea's name of a strategy ``make_strategy`` made (``fedavg``, ``fedadam``, ...)."""
    return str(getattr(strategy, "name", type(strategy).__name__.lower()))
