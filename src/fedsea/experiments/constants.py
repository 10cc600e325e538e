"""The experiment drivers' names and defaults that the command line shows, without torch.

``fedsea attack --help``, ``fedsea bench generate --help``, ``fedsea baseline --help`` and
``fedsea demo --help`` print them; the drivers (``attack_grid``, ``bench_generate``,
``task_baseline``, ``demo``) import torch and re-export them from here.
"""

from __future__ import annotations

# The privacy attack grid (``fedsea.experiments.attack_grid``, PRIVACY.md).
DEFENCES: tuple[str, ...] = ("none", "shaped", "nopeek", "adversarial")
ATTACKS: tuple[str, ...] = ("probe", "decoder", "optimization", "bisr")
# Defences that change the victim's head: the caller trains it (``victim_head``).
HEAD_DEFENCES: tuple[str, ...] = ("nopeek", "adversarial")
# The head the attacker makes its training pairs with (and optimises through): the public base
# head, or the victim's own head with its adapter. A FedAvg server receives every client's head
# adapter, so in a federated run "victim" is the realistic attacker; in split-only training,
# where the head adapter never leaves the client, "base" is.
ATTACKER_HEADS: tuple[str, ...] = ("base", "victim")

# The one-way latency the generation benchmark emulates by default (a WAN round trip of 50 ms).
GENERATE_LATENCY_MS = 25.0

# task -> rows evaluated by ``fedsea baseline`` (COPA's validation split has 100 rows only).
BASELINE_ROWS: dict[str, int] = {"sst2": 200, "boolq": 200, "rte": 200, "copa": 200, "xsum": 100, "quac": 100}

# New tokens ``fedsea demo --split-only`` generates.
SPLIT_DEMO_NEW_TOKENS = 48

__all__ = [
    "ATTACKER_HEADS",
    "ATTACKS",
    "BASELINE_ROWS",
    "DEFENCES",
    "GENERATE_LATENCY_MS",
    "HEAD_DEFENCES",
    "SPLIT_DEMO_NEW_TOKENS",
]
