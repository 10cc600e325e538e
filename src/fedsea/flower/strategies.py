"""Flower's own strategies for fedsea's rounds, configured from the run file's federation settings."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedTrimmedAvg

from fedsea.federation.config import FedConfig


def make_strategy(name: str, fed: FedConfig) -> Any:
    """The Flower strategy ``name`` with the run's sampling: ``fraction`` of the connected nodes
    each round (at least one).

    The wait for ``expected_clients`` is fedsea's (``FlowerRounds.discover``, bounded by
    ``join_timeout_s``): Flower's ``min_available_nodes`` would wait for them without end.

    Flower's strategies aggregate whole records, so fedsea's per-update checks (``max_update_rms``,
    ``clip_norm``) run before them (``fedsea.flower.rounds``); no client evaluation round is run
    (fedsea evaluates the global adapter itself).
    """
    common: dict[str, Any] = {
        "fraction_train": fed.fraction,
        "fraction_evaluate": 0.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 0,
        "min_available_nodes": 1,
    }
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedadam":
        # Server-side Adam on the averaged change (Reddi et al. 2021); LoRA deltas per round are
        # ~1e-3, so a server rate of 1e-2 keeps steps of that size.
        return FedAdam(**common, eta=1e-2, eta_l=1e-3, tau=1e-6)
    if name == "median":
        return FedMedian(**common)
    if name == "trimmed-mean":
        return FedTrimmedAvg(**common, beta=fed.trim_fraction)
    raise ValueError(f"unknown Flower strategy {name!r}")
