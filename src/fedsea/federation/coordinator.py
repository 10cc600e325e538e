"""The federated-run coordinator: joins, rounds, modes, aggregation, checkpoints.

Network-free: it implements the server's ``fedsea.server.rounds.RoundService`` over a
``TrunkHost``; the servicer turns RPCs into calls on it (``coordinator_factory`` builds it).

Design decisions:
- One global adapter keyed by global layer number covers the whole model. A selected
  client receives the tensors of its head and tail blocks; the server loads the tensors of
  its trunk blocks into the client's training session before the client starts.
- ``hierarchical``: every selected client trains in parallel against its own trunk adapter
  (its session's); at the round's end the trunk adapters are averaged like the rest.
  ``sequential``: clients take turns; the trunk adapter passes from one to the next, and is
  taken as it is at the end. Local optimizers restart every round (the FedAvg convention),
  so a round's checkpoint (global adapter, round, RNG states) is all a resume needs.
- A client that has not submitted when the round times out (or whose session is gone) is
  left out of the average and can join again later; late submissions are refused.
- Every update is checked before it is averaged (``fedsea.federation.validation``): the
  head/tail a client sends and the trunk adapter read from its session. A bad one is refused
  (INVALID_ARGUMENT), its client left out of the round and banned after ``max_faults``
  refusals; no client's update, nor a failing round, ends the run for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedsea.errors import FedseaError, InvalidInputError, ModelMismatchError, ProtocolError, SessionNotFoundError
from fedsea.federation.checkpoint import latest_round, load_round, save_round
from fedsea.federation.config import FedConfig
from fedsea.federation.groups import close_group, discard_groups, open_groups, trunk_part
from fedsea.federation.initial import initial_global_state
from fedsea.federation.strategy import Update, make_strategy
from fedsea.federation.validation import FaultBook, check_update, read_records
from fedsea.server.batching import GroupBatcher
from fedsea.server.rounds import RoundServiceFactory, RunInfo
from fedsea.server.trunk import Session, TrunkHost

__all__ = ["Coordinator", "Member", "coordinator_factory", "initial_global_state"]
logger = logging.getLogger(__name__)


@dataclass
class Member:
    """A client that joined the run, with its training session and sample count."""

    client_id: str
    session_id: str
    num_samples: int
    joined: float


class Coordinator:
    """Runs the rounds of one federated run on a ``TrunkHost``.

    Args:
        host: sessions and compute.
        config: the run.
        run_dir: where checkpoints and ``metrics.jsonl`` go (None: nowhere).
        compute: runs a blocking function off the event loop (the servicer's executor).
        resume: continue from the latest checkpoint in ``run_dir``.
    """

    def __init__(
        self,
        host: TrunkHost,
        config: FedConfig,
        run_dir: Path | None,
        compute: Callable[..., Any],
        resume: bool = False,
    ) -> None:
        self.host = host
        self.config = config
        self.run_dir = run_dir
        self._compute = compute
        self.strategy = make_strategy(config.strategy, config.fraction, config.min_clients, config.clip_norm,
                                      config.trim_fraction, config.max_update_rms)  # fmt: skip
        self.faults = FaultBook(config.max_faults)
        self.members: dict[str, Member] = {}
        self.completed = 0
        self.global_state: dict[str, torch.Tensor] = {}
        if resume and run_dir is not None and (folder := latest_round(run_dir)) is not None:
            self.completed, self.global_state, _, extra = load_round(folder)
            torch.random.set_rng_state(torch.tensor(extra["torch_rng"], dtype=torch.uint8))
            logger.info("resuming after round %d from %s", self.completed, folder)
            self.faults.replay(r for r in read_records(run_dir) if r.get("round", 0) <= self.completed)
        self.global_state = self.global_state or initial_global_state(host, config)
        self.current: int | None = None  # the open round
        self.allowed: set[str] = set()  # who may fetch the open round now (sequential: one at a time)
        self.selected: list[str] = []
        self.submitted: dict[str, Update] = {}
        self._trunk_of: dict[str, dict[str, torch.Tensor]] = {}  # each submitter's trunk adapter
        self._trunk_start: dict[str, dict[str, torch.Tensor]] = {}  # what each one's trunk started from
        self.refused: dict[str, str] = {}  # this round's refused parties and why
        self._gone: set[str] = set()  # selected clients whose session was gone at the round's start
        self.batchers: list[GroupBatcher] = []  # client-batch mode: this round's groups
        self.finished = self.completed >= config.rounds
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    # -- client-facing ------------------------------------------------------------------------
    def run_info(self) -> RunInfo:
        """The run's shape and the next round to be played."""
        cfg = self.config
        return RunInfo(cfg.rounds, cfg.local_steps, cfg.mode, cfg.seed, self.completed + 1)

    async def join(self, client_id: str, session_id: str, num_samples: int) -> Member:
        """Admit a session with the run's trunk LoRA (and cut, for per-part LoRA); a rejoin replaces the old one."""
        self.faults.check(client_id)
        session = self.host.get(client_id, session_id)
        trunk_lora = self.config.split_lora.trunk
        if session.spec.lora != trunk_lora:
            raise ModelMismatchError(
                f"the session's trunk LoRA {session.spec.lora} differs from the run's {trunk_lora}"
            )
        cut, trunk = self.config.cut, (session.trunk.start, session.trunk.end)
        if cut is not None and trunk != (cut[0], self.host.num_layers - cut[1]):
            # Parts with different LoRA: a block trained as another part would not fit the global adapter.
            raise ModelMismatchError(
                f"this run's parts have different LoRA, so every client cuts at (p, q) = {cut}; the session's "
                f"trunk is blocks [{trunk[0]}, {trunk[1]})"
            )
        if num_samples < 1:
            raise ProtocolError("num_samples must be >= 1")
        async with self._changed:
            member = Member(client_id, session_id, num_samples, time.monotonic())
            self.members[client_id] = member  # a rejoin replaces the old session
            self._changed.notify_all()
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        logger.info("client %s joined (session %s, %d samples)", client_id, session_id, num_samples)
        return member

    async def await_round(self, client_id: str, after: int) -> tuple[int, bool, bool, dict[str, torch.Tensor]]:
        """Block until a round after ``after`` is open to this client (or the run is over)."""
        async with self._changed:
            while True:
                self.faults.check(client_id)
                if self.finished:
                    return self.completed, False, True, {}
                if self.current is not None and self.current > after:
                    if client_id not in self.selected:
                        return self.current, False, False, {}
                    if client_id in self.allowed:
                        break
                await self._changed.wait()
            round_number = self.current
        member = self.members[client_id]
        session = self.host.get(client_id, member.session_id)
        keys = self._client_keys(session)
        return round_number, True, False, {k: self.global_state[k] for k in keys if k in self.global_state}

    async def submit(
        self, client_id: str, round_number: int, num_samples: int, loss: float, state: dict[str, torch.Tensor]
    ) -> None:
        """Take a client's head/tail update for the open round, with its trunk adapter read from its session.

        Both are checked (``check_update``) against the global adapter (the trunk: against what it
        started the round from); a bad one raises ``InvalidInputError`` and leaves the client out.
        """
        self.faults.check(client_id)
        if num_samples < 1:
            raise InvalidInputError("num_samples", "must be >= 1")
        async with self._changed:
            if self.current != round_number or client_id not in self.allowed or client_id in self.submitted:
                raise ProtocolError(
                    f"round {round_number} is not open to client {client_id!r} (closed or not selected)"
                )
            member = self.members[client_id]
        session = self.host.get(client_id, member.session_id)
        bound = self.strategy.max_update_rms
        head_tail = {k: self.global_state[k] for k in self._client_keys(session)}
        trunk_state: dict[str, torch.Tensor] = {}
        try:
            await self._compute(check_update, state, head_tail, "update", bound)
            if self.config.mode != "client-batch":  # there the group's adapter is trained, checked at the end
                trunk_state = await self._compute(self.host.get_adapter, client_id, member.session_id)
                start = self._trunk_start.get(client_id, self._trunk_keys(session))
                await self._compute(check_update, trunk_state, start, "trunk adapter", bound)
        except InvalidInputError as exc:
            await self.refuse(client_id, round_number, str(exc))
            raise
        async with self._changed:
            if self.current != round_number or client_id not in self.allowed or client_id in self.submitted:
                raise ProtocolError(
                    f"round {round_number} closed for client {client_id!r} while its update was checked"
                )
            self.submitted[client_id] = Update(client_id, float(num_samples), state, {"loss": loss})
            self._trunk_of[client_id] = trunk_state
            self._changed.notify_all()

    async def refuse(self, client_id: str, round_number: int, reason: str) -> None:
        """Leave a client with a bad update for the open round out of it (it may join again); count the fault.

        Called by ``submit`` and by the servicer (a NaN/Inf tensor). An update the round would not take
        anyway (closed, not selected, refused) is no fault: refused all the same, and no log line.
        """
        async with self._changed:
            if self.current != round_number or client_id not in self.allowed or client_id in self.submitted:
                return  # not the open round's to take (an accepted update stays accepted)
            self.refused[client_id] = reason
            self.allowed.discard(client_id)
            self.members.pop(client_id, None)  # now: a rejoin during the round must not be undone
            for batcher in self.batchers:  # client-batch: its group's next steps no longer wait for it
                batcher.active = [m for m in batcher.active if m[0] != client_id]
            banned = self.faults.record(client_id)
            self._changed.notify_all()
        logger.warning("round %d: refused the update of %s%s: %s", round_number, client_id,
                       " (now banned from the run)" if banned else "", reason)  # fmt: skip

    def batcher_for(self, client_id: str, session_id: str) -> GroupBatcher | None:
        """The client-batch group this session trains in this round, if any."""
        for batcher in self.batchers:
            if batcher.has(client_id, session_id):
                return batcher
        return None

    # -- rounds -------------------------------------------------------------------------------------
    def _client_keys(self, session: Session) -> list[str]:
        trunk = session.trunk
        return [k for k in self.global_state if not trunk.start <= int(k.split(".")[1]) < trunk.end]

    def _trunk_keys(self, session: Session) -> dict[str, torch.Tensor]:
        return trunk_part(self.global_state, session)

    async def _load_trunk(self, client_id: str, state: dict[str, torch.Tensor]) -> bool:
        """Load the client's trunk blocks of ``state``; False (the client left out) if its session is gone."""
        try:
            member = self.members[client_id]
            part = self._trunk_start[client_id] = trunk_part(state, self.host.get(client_id, member.session_id))
            await self._compute(self.host.put_adapter, client_id, member.session_id, part)
            return True
        except (SessionNotFoundError, KeyError):  # closed (its client exited) since the round began
            self._alive([client_id])
            return False

    def _alive(self, selected: list[str]) -> None:
        """Leave out the selected clients whose session is gone (closed or expired since they joined)."""
        for client_id in selected:
            try:
                self.host.get(client_id, self.members[client_id].session_id)
            except (FedseaError, KeyError):
                logger.warning("client %s left out: its session is gone", client_id)
                self._gone.add(client_id)
                self.members.pop(client_id, None)

    async def _wait_for_members(self) -> None:
        deadline = time.monotonic() + self.config.join_timeout_s
        async with self._changed:
            while len(self.members) < self.config.expected_clients:
                left = deadline - time.monotonic()
                if left <= 0 and len(self.members) >= self.config.min_clients:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=max(left, 1.0))

    async def _open(self, round_number: int, selected: list[str], allowed: set[str]) -> None:
        async with self._changed:
            self.current, self.selected, self.allowed = round_number, selected, allowed
            self._changed.notify_all()

    async def _wait_submitted(self, who: set[str], deadline: float) -> None:
        async with self._changed:
            while not who <= {*self.submitted, *self.refused, *self._gone}:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=left)
                except TimeoutError:
                    return

    async def _run(self) -> None:
        try:
            await self._wait_for_members()
            for round_number in range(self.completed + 1, self.config.rounds + 1):
                try:
                    await self._round(round_number)
                except Exception as exc:  # a fault of this round must not end the run for everyone
                    logger.exception("round %d failed; the global adapter stays as it was", round_number)
                    await self._close(round_number, {"round": round_number, "error": type(exc).__name__})
        except Exception:
            logger.exception("the federated run failed")
            raise
        finally:
            async with self._changed:
                self.finished = True
                self.current = None
                self._changed.notify_all()

    async def _round(self, round_number: int) -> None:
        started, cfg = time.monotonic(), self.config
        pool = list(self.members)
        selected = self.strategy.select(pool, round_number, self.config.seed)
        self.submitted, self._trunk_of, self._trunk_start, self.refused, self._gone = {}, {}, {}, {}, set()
        self._alive(selected)
        selected = [c for c in selected if c not in self._gone]
        deadline = time.monotonic() + self.config.round_timeout_s
        updates: list[Update] = []
        if self.config.mode == "sequential":
            shared = dict(self.global_state)
            await self._open(round_number, selected, set())
            for client_id in selected:
                if client_id not in self.members or not await self._load_trunk(client_id, shared):
                    continue  # gone since the round began
                async with self._changed:
                    self.allowed = {client_id}
                    self._changed.notify_all()
                await self._wait_submitted({client_id}, deadline)
                if client_id in self._trunk_of:
                    shared.update(self._trunk_of[client_id])
            done = [c for c in selected if c in self.submitted]
            trunk_keys = {k for c in done for k in self._trunk_of[c]}
            if done:
                weight = float(sum(self.submitted[c].weight for c in done))
                updates.append(Update("trunk:shared", weight, {k: shared[k] for k in trunk_keys}))
        elif self.config.mode == "client-batch":
            sessions = {c: self.members[c].session_id for c in selected}
            groups = await open_groups(self.host, sessions, self.global_state, self._compute, cfg.round_timeout_s)
            self.batchers = [g[0] for g in groups]
            try:
                await self._open(round_number, selected, set(selected))
                await self._wait_submitted(set(selected), deadline)
                for _, clients, group_id in groups:
                    done = [c for c in clients if c in self.submitted]
                    bound = self.strategy.max_update_rms
                    state, why = await close_group(self.host, group_id, self.global_state, self._compute, bound)
                    if why is not None and done:  # trained by several clients: refused as a whole, no one's fault
                        self.refused[f"trunk:group-{group_id}"] = why
                    elif state is not None and done:
                        weight = float(sum(self.submitted[c].weight for c in done))
                        updates.append(Update(f"trunk:group-{group_id}", weight, state))
            finally:  # a failed round must not leave the groups' sessions (a trunk LoRA each) open
                self.batchers = []
                await discard_groups(self.host, [g[2] for g in groups], self._compute)
        else:
            selected = [c for c in selected if await self._load_trunk(c, self.global_state)]
            await self._open(round_number, selected, set(selected))
            await self._wait_submitted(set(selected), deadline)
            done = [c for c in selected if c in self.submitted]
            updates += [Update(f"trunk:{c}", self.submitted[c].weight, self._trunk_of[c]) for c in done]
        async with self._changed:
            self.allowed = set()  # late submissions are refused from here on
            done = [c for c in selected if c in self.submitted]
            updates += [self.submitted[c] for c in done]
        if len(done) < self.config.min_clients:
            logger.warning("round %d: %d of %d clients submitted (< min_clients); global unchanged",
                           round_number, len(done), len(selected))  # fmt: skip
        else:
            try:
                self.global_state = await self._compute(self.strategy.aggregate, updates, self.global_state)
            except Exception:  # checked updates should not fail; if one does, it ends no run
                logger.exception("round %d: aggregation failed; the global adapter stays as it was", round_number)
        dropped = sorted((set(selected) - set(done) - set(self.refused)) | self._gone)
        for client_id in dropped:  # left out; they may join again
            self.members.pop(client_id, None)
        record = {
            "round": round_number,
            "selected": selected,
            "submitted": done,
            "dropped": dropped,
            "losses": {c: self.submitted[c].metrics.get("loss") for c in done},
            "samples": {c: self.submitted[c].weight for c in done},
            "refused": dict(self.refused),
            "banned": sorted(self.faults.banned),
            "seconds": time.monotonic() - started,
            "mode": self.config.mode,
        }
        await self._close(round_number, record)
        logger.info("round %d closed: %d/%d clients", round_number, len(done), len(selected))

    async def _close(self, round_number: int, record: dict[str, Any]) -> None:
        """Checkpoint the global adapter, log the round's record and mark the round played."""
        if self.run_dir is not None:
            await self._compute(save_round, self.run_dir, round_number, self.global_state, None, {"record": record})
            with (self.run_dir / "server_rounds.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        async with self._changed:
            self.completed = round_number
            self.current, self.allowed = None, set()
            self._changed.notify_all()


def coordinator_factory(config: FedConfig, run_dir: Path | None, resume: bool = False) -> RoundServiceFactory:
    """What ``TrunkServer(rounds=...)`` takes to run ``config``'s rounds on its trunk host."""

    def build(host: TrunkHost, compute: Callable[..., Any]) -> Coordinator:
        return Coordinator(host, config, run_dir, compute, resume)

    return build
