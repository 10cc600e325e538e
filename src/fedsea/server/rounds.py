"""The interface through which the servicer reaches a federated run's round logic.

The server owns this interface and knows nothing of how rounds are run: ``fedsea.federation``
(a layer below the server) implements it with its network-free coordinator, and whoever
starts a server for a run (``fedsea serve --run``, ``simulate``, tests) passes a factory in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedsea.server.batching import GroupBatcher
from fedsea.server.trunk import TrunkHost


@dataclass(frozen=True)
class RunInfo:
    """What a joining client is told about the run."""

    rounds: int
    local_steps: int
    mode: str
    seed: int
    next_round: int


class RoundService(Protocol):
    """Joins, round hand-outs and update submissions of one federated run."""

    def run_info(self) -> RunInfo:
        """The run's shape and the next round to be played."""
        ...

    async def join(self, client_id: str, session_id: str, num_samples: int) -> Any:
        """Admit a client's training session to the run (a rejoin replaces the old session).

        Raises ``BannedError`` (PERMISSION_DENIED) for a client banned from the run.
        """
        ...

    async def await_round(self, client_id: str, after: int) -> tuple[int, bool, bool, dict[str, torch.Tensor]]:
        """Block until a round after ``after`` opens: (round, selected, finished, head/tail tensors).

        Raises ``BannedError`` (PERMISSION_DENIED) for a client banned from the run, also while it waits.
        """
        ...

    async def submit(
        self, client_id: str, round_number: int, num_samples: int, loss: float, state: dict[str, torch.Tensor]
    ) -> None:
        """Take a client's head/tail update (decoded and size-checked by the servicer) for the open round.

        The round service checks the update (and any trunk adapter the client trained) before it
        is averaged. Raises ``InvalidInputError`` (INVALID_ARGUMENT) for ``num_samples`` < 1 or a bad
        update, naming the key and the problem (the client is then left out of the round),
        ``ProtocolError`` when the round is not open to the client, ``BannedError`` for a banned one.
        """
        ...

    async def refuse(self, client_id: str, round_number: int, reason: str) -> None:
        """Leave a client whose update for ``round_number`` was refused out of that round; count the fault."""
        ...

    def batcher_for(self, client_id: str, session_id: str) -> GroupBatcher | None:
        """The client-batch group this session trains in this round, if any."""
        ...


# Builds the round service once the servicer exists: (trunk host, run-blocking-on-compute-thread).
RoundServiceFactory = Callable[[TrunkHost, Callable[..., Any]], RoundService]
