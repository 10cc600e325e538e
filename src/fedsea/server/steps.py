"""A session's training steps: alone on the trunk host, or joined with its client-batch group.

In a federated run's client-batch mode the round service (or, on Flower, the trunk range's
group stage) hands out one ``GroupBatcher`` per trunk range, and a member's forward and
backward go through it; otherwise (no run, another mode, a session outside the round) the
host computes the step on the session's own adapter.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from fedsea.errors import InvalidInputError
from fedsea.model.masks import check_finite, check_lengths
from fedsea.server.batching import GroupBatcher
from fedsea.server.trunk import TrunkHost

# Runs a blocking function on the compute thread: (result, seconds it computed).
Compute = Callable[..., Awaitable[tuple[Any, float]]]


def _refuse_micro_batches(micro_batches: int) -> None:
    # The group joins whole batches into one pass and steps once per joint backward: slices of
    # one member's step would each step the shared adapter, so they are refused, not joined.
    if micro_batches > 1:
        raise InvalidInputError(
            "micro_batches",
            f"{micro_batches}: client-batch mode joins whole batches; use micro_batches=1 in this run",
        )


class StepRouter:
    """Forward and backward of training steps, routed by the session's mode in the run.

    Args:
        host: sessions and compute.
        compute: runs a blocking call on the compute thread and times it.
        groups: the client-batch group a session (owner, session id) trains in, if any (a native
            run's round service or a Flower run's group stage; looked up per step).
    """

    def __init__(self, host: TrunkHost, compute: Compute, groups: Callable[[str, str], GroupBatcher | None]) -> None:
        self.host = host
        self._compute = compute
        self._group = groups

    async def forward(
        self,
        owner: str,
        session_id: str,
        step: int,
        hidden: torch.Tensor,
        lengths: torch.Tensor,
        micro: int = 0,
        micro_batches: int = 1,
    ) -> tuple[torch.Tensor, float]:
        """h~_p (B, n, d) -> h_{L-q} (B, n, d), and the seconds it computed (slice ``micro`` of ``micro_batches``)."""
        group = self._group(owner, session_id)
        if group is None:
            result: tuple[torch.Tensor, float] = await self._compute(
                self.host.forward, owner, session_id, step, hidden, lengths, micro, micro_batches
            )
            return result
        _refuse_micro_batches(micro_batches)
        # Validate alone first: one client's bad tensor must not fail the whole group.
        check_lengths(lengths, hidden.shape[0], hidden.shape[1])
        check_finite(hidden, "hidden")
        start = time.perf_counter()
        out = await group.forward(owner, session_id, hidden.float(), lengths)
        return out, time.perf_counter() - start

    async def backward(
        self,
        owner: str,
        session_id: str,
        step: int,
        grad: torch.Tensor,
        update: bool,
        micro: int = 0,
        micro_batches: int = 1,
    ) -> tuple[torch.Tensor, float]:
        """dL/dh_{L-q} (B, n, d) -> dL/dh~_p (B, n, d), and the seconds it computed (slice ``micro``)."""
        group = self._group(owner, session_id)
        if group is None:
            result: tuple[torch.Tensor, float] = await self._compute(
                self.host.backward, owner, session_id, step, grad, update, micro, micro_batches
            )
            return result
        _refuse_micro_batches(micro_batches)
        check_finite(grad, "grad")  # as the host checks it alone, before the group's joint pass
        start = time.perf_counter()
        grad_in = await group.backward(owner, session_id, grad.float())
        return grad_in, time.perf_counter() - start
