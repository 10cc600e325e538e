"""Client-batch mode: the clients' batches joined into one trunk pass per step.

All members of a group share one trunk adapter (held by a server-owned session). Each
step, the group waits for every member's forward (or for ``step_timeout_s``, after which
the missing are left out for the rest of the round), left-pads the hidden states to one
length, runs the trunk once on the concatenation, and hands each member its rows. The
backward does the same with the gradients and steps the shared adapter once.

Shapes: member i sends (B_i, n_i, d); the joint pass is (sum B_i, max n_i, d). Left
padding keeps every row's real tokens at the end, so masks rebuilt from the lengths stay
right and the padded slots never influence a real token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import torch

from fedsea.errors import ProtocolError
from fedsea.server.trunk import Session, TrunkHost

GROUP_OWNER = "fedsea:client-batch"  # owner of the shared trunk sessions; no token can claim it
Member = tuple[str, str | None]  # (owner, session id); None: a member whose session has not joined yet


@dataclass
class _Arrival:
    tensor: torch.Tensor
    lengths: torch.Tensor | None
    future: asyncio.Future[torch.Tensor]


class GroupBatcher:
    """One shared-trunk group of clients for one round.

    Args:
        host: the trunk host.
        group: the shared session (owned by ``GROUP_OWNER``) whose trunk adapter the group trains.
        members: (owner, session id) in the joint pass's row order; a session id of None is a
            member still to come (``bind``): the steps wait for it as for any member.
        compute: runs a blocking call on the compute thread and returns its result.
        step_timeout_s: how long a step waits for every member; the late are then left out.
    """

    def __init__(
        self,
        host: TrunkHost,
        group: Session,
        members: list[Member],
        compute: Callable[..., Awaitable[Any]],
        step_timeout_s: float,
    ) -> None:
        self.host = host
        self.group = group
        self.active: list[Member] = list(members)  # in a fixed order: the joint pass's rows
        self._compute = compute
        self.timeout = step_timeout_s
        self._forward: dict[Member, _Arrival] = {}
        self._backward: dict[Member, _Arrival] = {}
        self._joined: list[Member] = []  # members of the pending joint forward, in row order
        self._pending: tuple[torch.Tensor, torch.Tensor, list[int], list[int]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()

    def has(self, owner: str, session_id: str) -> bool:
        """Whether this session is still one of the group's active members."""
        return (owner, session_id) in self.active

    def waits_for(self, owner: str) -> bool:
        """Whether ``owner`` is a member still to come (not bound, not left out by a step's timeout)."""
        return (owner, None) in self.active

    def bind(self, owner: str, session_id: str) -> None:
        """Make ``session_id`` the session of ``owner``, a member still to come, in its place in the rows.

        Raises:
            ProtocolError: ``owner`` is not a member still to come.
        """
        if not self.waits_for(owner):
            raise ProtocolError(f"{owner!r} is not a member still to come of this client-batch group")
        # A new list, assigned at once: the event loop's barrier may read ``active`` meanwhile.
        self.active = [(o, session_id) if (o, s) == (owner, None) else (o, s) for o, s in self.active]

    async def forward(self, owner: str, session_id: str, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Join this member's h~_p (B, n, d) into the group's trunk pass; return its rows of h_{L-q} (B, n, d)."""
        key = (owner, session_id)
        async with self._lock:
            if key in self._forward:
                raise ProtocolError("a forward of this client is already waiting for the group")
            future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
            self._forward[key] = _Arrival(hidden, lengths, future)
            self._maybe_launch(self._forward, self._run_forward)
        return await future

    async def backward(self, owner: str, session_id: str, grad: torch.Tensor) -> torch.Tensor:
        """Join this member's dL/dh_{L-q} (B, n, d) into the group's backward; return its dL/dh~_p (B, n, d)."""
        key = (owner, session_id)
        async with self._lock:
            if key not in self._joined:
                raise ProtocolError("backward without a forward in the group's pending step")
            future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
            self._backward[key] = _Arrival(grad, None, future)
            self._maybe_launch(self._backward, self._run_backward, expected=self._joined)
        return await future

    # -- barrier ----------------------------------------------------------------------------
    def _maybe_launch(
        self,
        arrivals: dict[Any, _Arrival],
        run: Callable[[], Coroutine[Any, Any, None]],
        expected: list[Any] | None = None,
    ) -> None:
        waiting_for = set(expected if expected is not None else self.active)
        if waiting_for <= set(arrivals):
            self._cancel_timer()
            asyncio.get_running_loop().create_task(run())
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.timeout, self._on_timeout, arrivals, run)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self, arrivals: dict[Any, _Arrival], run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._timer = None
        # The late are left out for the rest of the round; the rest go on without them.
        self.active = [m for m in self.active if m in arrivals]
        if arrivals:
            asyncio.get_running_loop().create_task(run())

    # -- joint passes ---------------------------------------------------------------------------
    async def _run_forward(self) -> None:
        async with self._lock:
            order = [m for m in self.active if m in self._forward] + [m for m in self._forward if m not in self.active]
            arrivals = [self._forward.pop(m) for m in order]
            self._joined = order
        try:
            outs = await self._compute(self._joint_forward, arrivals)
            for arrival, out in zip(arrivals, outs, strict=True):
                if not arrival.future.done():
                    arrival.future.set_result(out)
        except Exception as exc:
            for arrival in arrivals:
                if not arrival.future.done():
                    arrival.future.set_exception(exc)

    def _joint_forward(self, arrivals: list[_Arrival]) -> list[torch.Tensor]:
        host, group = self.host, self.group
        width = max(a.tensor.shape[1] for a in arrivals)
        rows, sizes = [], []
        for a in arrivals:
            pad = width - a.tensor.shape[1]
            rows.append(
                torch.nn.functional.pad(a.tensor.to(host.model.device, host.model.dtype), (0, 0, pad, 0))
            )  # left-pad tokens
            sizes.append(a.tensor.shape[1])
        hidden = torch.cat(rows, dim=0)  # (sum B_i, N, d)
        lengths = torch.cat([a.lengths for a in arrivals if a.lengths is not None])  # (sum B_i,)
        blocks, tokens = (group.trunk.start, group.trunk.end), hidden.shape[0] * hidden.shape[1]
        with host.computing(group, training=True), host.activations.measure(blocks, tokens) as saved:
            inp = hidden.detach().requires_grad_(True)
            out = group.trunk(inp, lengths)  # (sum B_i, N, d)
        # Counted in the server's pending activations (so other forwards see them), not refused:
        # the joint pass is bounded by its members' batches and lives at most step_timeout_s.
        group.pending_bytes[0] = saved.bytes
        counts = [a.tensor.shape[0] for a in arrivals]
        self._pending = (inp, out, counts, sizes)
        pieces = torch.split(out.detach().cpu(), counts, dim=0)
        return [p[:, width - n :] for p, n in zip(pieces, sizes, strict=True)]

    async def _run_backward(self) -> None:
        async with self._lock:
            order = list(self._joined)
            arrivals = [self._backward.pop(m) if m in self._backward else None for m in order]
            self._joined = []
        try:
            grads = await self._compute(self._joint_backward, arrivals)
            for arrival, grad in zip(arrivals, grads, strict=True):
                if arrival is not None and not arrival.future.done():
                    arrival.future.set_result(grad)
        except Exception as exc:
            for arrival in arrivals:
                if arrival is not None and not arrival.future.done():
                    arrival.future.set_exception(exc)

    def _joint_backward(self, arrivals: list[_Arrival | None]) -> list[torch.Tensor | None]:
        if self._pending is None:
            raise ProtocolError("no joint forward to go backward through")
        inp, out, counts, sizes = self._pending
        self._pending = None
        self.group.pending_bytes.clear()
        width = out.shape[1]
        parts = []
        for arrival, count, n in zip(arrivals, counts, sizes, strict=True):
            if arrival is None:  # a member that left after its forward: no gradient from it
                parts.append(torch.zeros(count, width, out.shape[2], dtype=out.dtype, device=out.device))
            else:
                if tuple(arrival.tensor.shape) != (count, n, out.shape[2]):
                    raise ProtocolError(
                        f"grad of shape {tuple(arrival.tensor.shape)} for a forward of ({count}, {n}, d)"
                    )
                parts.append(torch.nn.functional.pad(arrival.tensor.to(out.device, out.dtype), (0, 0, width - n, 0)))
        host, group = self.host, self.group
        with host.computing(group):
            group.optimizer.zero_grad()
            out.backward(torch.cat(parts, dim=0))
            group.optimizer.step()
        assert inp.grad is not None
        pieces = torch.split(inp.grad.detach().cpu(), counts, dim=0)
        return [p[:, width - n :] for p, n in zip(pieces, sizes, strict=True)]
