"""The federated run's settings, shared by ``fedsea serve --run``, ``fedsea join`` and ``simulate``."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedsea.config import LoraSpec, SplitLora

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
        strategy: aggregation strategy name (``fedavg``).
        fraction: share of the joined clients sampled per round (seeded).
        min_clients: a round closes with at least this many updates.
        expected_clients: the first round waits for this many clients to join (or for
            ``join_timeout_s``, after which ``min_clients`` suffice).
        round_timeout_s: a selected client that has not submitted by then is left out.
        join_timeout_s: see ``expected_clients``.
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
    seed: int = 0
    lora: LoraSpec | SplitLora = field(default_factory=LoraSpec)
    cut: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.local_steps < 1:
            raise ValueError(f"rounds and local_steps must be >= 1, got {self.rounds} and {self.local_steps}")
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
