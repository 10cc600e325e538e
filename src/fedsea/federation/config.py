"""The federated run's settings, shared by ``fedsea serve --run``, ``fedsea join`` and ``simulate``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedsea.config import LoraSpec, SplitLora
from fedsea.federation.constants import DEFAULT_MAX_FAULTS, DEFAULT_MAX_UPDATE_RMS, STRATEGY_NAMES

MODES: tuple[str, ...] = ("sequential", "client-batch", "hierarchical")


@dataclass(frozen=True)
class FedConfig:
    """How the server runs the rounds.

    Args:
        rounds: number of FedAvg rounds.
        local_steps: optimizer steps each selected client takes per round.
        mode: ``sequential`` (clients one after another, sharing one trunk adapter: the
            baseline), ``client-batch`` (one shared trunk adapter; the clients' batches are
            joined into one trunk pass per step) or ``hierarchical`` (one trunk adapter per
            client, trained in parallel, averaged at the round's end).
        strategy: aggregation strategy: ``fedavg`` (the sample-weighted mean), ``median``
            (coordinate-wise median) or ``trimmed-mean`` (coordinate-wise mean without the
            ``trim_fraction`` largest and smallest values); the last two are robust to a minority
            of bad updates and ignore the sample counts clients declare.
        fraction: share of the joined clients sampled per round (seeded).
        min_clients: a round closes with at least this many updates.
        expected_clients: the first round waits for this many clients to join (or for
            ``join_timeout_s``, after which ``min_clients`` suffice).
        round_timeout_s: a selected client that has not submitted by then is left out.
        join_timeout_s: see ``expected_clients``.
        clip_norm: clip each update's change from the global adapter (all its tensors
            together) to this L2 norm before aggregating; unset: no clipping.
        trim_fraction: the share of values dropped at each end per coordinate by
            ``trimmed-mean`` (in [0, 0.5)).
        max_update_rms: an update (head/tail, or a trunk adapter) whose change from the global
            adapter has a root-mean-square per element over this in any tensor is refused; an
            honest AdamW round moves an element by at most ~ 3.2 x lr x local_steps (0.032 at
            lr 1e-3 and 10 steps); unset: no bound.
        max_faults: refused updates after which a client is banned from the run; unset: never.
        seed: seeds client sampling, the initial global adapter and the clients' data order.
        lora: the LoRA of every part (one spec), or of each part (a ``SplitLora``).
        cut: (p, q), the head and tail layers of every client: required when the parts' specs
            differ, since a block is then initialised, trained and averaged as one part only;
            ``join`` refuses a session cut elsewhere. ``None``: clients may cut anywhere.
    """

    rounds: int = 3
    local_steps: int = 10
    mode: str = "hierarchical"
    strategy: str = "fedavg"
    fraction: float = 1.0
    min_clients: int = 1
    expected_clients: int = 1
    round_timeout_s: float = 600.0
    join_timeout_s: float = 600.0
    clip_norm: float | None = None
    trim_fraction: float = 0.1
    max_update_rms: float | None = DEFAULT_MAX_UPDATE_RMS
    max_faults: int | None = DEFAULT_MAX_FAULTS
    seed: int = 0
    lora: LoraSpec | SplitLora = field(default_factory=LoraSpec)
    cut: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.local_steps < 1:
            raise ValueError(f"rounds and local_steps must be >= 1, got {self.rounds} and {self.local_steps}")
        if self.strategy.lower() not in STRATEGY_NAMES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGY_NAMES)}, got {self.strategy!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_clients < 1 or self.expected_clients < self.min_clients:
            raise ValueError(
                f"need 1 <= min_clients <= expected_clients, got {self.min_clients} and {self.expected_clients}"
            )
        if self.round_timeout_s <= 0 or self.join_timeout_s <= 0:
            raise ValueError("round_timeout_s and join_timeout_s must be > 0")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be a finite number > 0 or unset, got {self.clip_norm}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.max_update_rms is not None and not (self.max_update_rms > 0):
            raise ValueError(f"max_update_rms must be > 0 or unset, got {self.max_update_rms}")
        if self.max_faults is not None and self.max_faults < 1:
            raise ValueError(f"max_faults must be >= 1 or unset, got {self.max_faults}")
        if self.cut is not None and min(self.cut) < 1:
            raise ValueError(f"cut must be (p, q) with p, q >= 1, got {self.cut!r}")
        if self.split_lora.uniform_spec is None and self.cut is None:
            raise ValueError(
                f"the parts' LoRA differ ({self.split_lora.summary()}): give cut = (p, q), every client's, "
                "so that each block of the global adapter belongs to one part"
            )

    @property
    def split_lora(self) -> SplitLora:
        """The LoRA of each part (one spec: the same on all three)."""
        return SplitLora.uniform(self.lora) if isinstance(self.lora, LoraSpec) else self.lora
