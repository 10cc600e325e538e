"""The federated run's names and defaults that its settings need before any tensor exists.

``fedsea.federation.config`` (``FedConfig``) validates against these and the command line shows
them in ``--help``; they live apart from ``strategy`` and ``validation`` (which import torch) so
that reading a run file's schema or printing ``fedsea simulate --help`` stays a fraction of a second.
"""

from __future__ import annotations

# The aggregation strategies of ``FedConfig.strategy``: the keys of ``fedsea.federation.strategy.STRATEGIES``
# (tests/unit/test_cli_startup.py checks the two agree).
STRATEGY_NAMES: tuple[str, ...] = ("fedavg", "median", "trimmed-mean")
DEFAULT_MAX_UPDATE_RMS = 10.0  # RMS change per element an update may make (fedsea.federation.validation)
DEFAULT_MAX_FAULTS = 3  # refused updates before a client is banned from the run

__all__ = ["DEFAULT_MAX_FAULTS", "DEFAULT_MAX_UPDATE_RMS", "STRATEGY_NAMES"]
