"""Trunk adapter stages: the trunk server's side of a Flower run (no gRPC).

In a Flower run the ServerApp (the control plane) drives the rounds and this server stays the
data plane: trunk adapter bytes never go through a client. Per round:

1. the operator stages the round's global trunk adapter under a key of its choosing
   (``stage``; keys ``layers.N....`` of any trunk blocks, as the native coordinator keeps them);
2. each client's session loads the tensors of exactly its own trunk blocks from it (``load``;
   strict, like ``TrunkHost.put_adapter``), which is remembered as the session's starting point;
3. after local training, each client publishes its session's trunk adapter under the key
   (``publish``: a copy, keyed by the client id, global keys);
4. the operator collects the published states (``collect``) and frees them (``drop``).

Memory: every stage and published state is a CPU float32 copy, counted against
``max_staged_bytes`` (all together) and ``max_adapter_bytes`` (each); at most ``max_stages``
keys are staged at once. A session's starting point holds references to its stage's tensors
(no copy) and is forgotten with the session or the stage. Stages and published states unused for
``idle_timeout_s`` are freed by the server's reaper (``reap_idle``); a stage is kept while a
session that loaded it is open (a round longer than the idle timeout keeps its stage).
Locks: the compute lock (loads and copies of a session's adapter), then this store's own lock,
held briefly and never while waiting for the compute lock.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedsea.errors import InvalidInputError, LimitExceededError, StageNotFoundError
from fedsea.model.adapters import adapter_parameters
from fedsea.server.batching import GROUP_OWNER
from fedsea.server.stage_groups import StageGroups, check_group
from fedsea.server.trunk import Session, TrunkHost
from fedsea.wire.stage_keys import check_stage_key

# A global trunk adapter key: its block number after "layers." (``fedsea.federation.groups.trunk_part``).
TRUNK_KEY = re.compile(r"^layers\.(\d+)\.")

State = dict[str, torch.Tensor]


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a state's tensors."""
    return sum(t.numel() * t.element_size() for t in state.values())


@dataclass
class _Held:
    """A stored state, its size and when it was last used (monotonic)."""

    state: State
    bytes: int
    last_used: float = field(default_factory=time.monotonic)


class TrunkStaging:
    """Stages (key -> global trunk adapter) and published states ((key, client id) -> trunk adapter).

    Args:
        host: the sessions (adapters are loaded and copied under its compute lock); the limits
            are its ``max_stages``, ``max_staged_bytes``, ``max_adapter_bytes`` and ``idle_timeout_s``.
    """

    def __init__(self, host: TrunkHost) -> None:
        self.host = host
        self.limits = host.limits
        self._lock = threading.Lock()
        self._stages: dict[str, _Held] = {}
        self._published: dict[tuple[str, str], _Held] = {}
        self._starts: dict[str, tuple[str, State]] = {}  # session id -> (stage key, its trunk blocks' tensors)
        self._held = 0
        self.groups = StageGroups(host)  # client-batch group stages (the servicer gives it its compute)
        host.on_drop.append(self._session_dropped)

    # -- accounting ------------------------------------------------------------------------------
    def held_bytes(self) -> int:
        """Bytes of all stages and published states now."""
        with self._lock:
            return self._held

    def counts(self) -> tuple[int, int]:
        """(stages, published states) held now."""
        with self._lock:
            return len(self._stages), len(self._published)

    def start(self, session_id: str) -> tuple[str, State] | None:
        """The session's starting point: (stage key, the tensors it loaded), or None."""
        with self._lock:
            return self._starts.get(session_id)

    def _reserve(self, more: int, what: str) -> None:
        """Count ``more`` bytes (call with the lock held); RESOURCE_EXHAUSTED past ``max_staged_bytes``."""
        if self._held + more > self.limits.max_staged_bytes:
            raise LimitExceededError(
                f"{what}: staged and published trunk adapters would hold more than max_staged_bytes="
                f"{self.limits.max_staged_bytes} bytes; collect with drop or wait for old ones to expire"
            )
        self._held += more

    def _check_size(self, size: int, what: str) -> None:
        if size > self.limits.max_adapter_bytes:
            raise LimitExceededError(f"{what}: {size} bytes exceed max_adapter_bytes={self.limits.max_adapter_bytes}")

    # -- the operator ----------------------------------------------------------------------------
    def check_room(self, key: str) -> None:
        """Refuse a new key when ``max_stages`` are staged (before its bytes arrive; ``stage`` checks again)."""
        check_stage_key(key)
        with self._lock:
            if key not in self._stages and len(self._stages) >= self.limits.max_stages:
                raise LimitExceededError(
                    f"stage {key!r}: {len(self._stages)} stages are held (max_stages={self.limits.max_stages}); "
                    "collect an old one with drop first"
                )

    def stage(self, key: str, state: State, group: tuple[list[str], float] | None = None) -> int:
        """Stage ``state`` (global keys ``layers.N....``) under ``key``, replacing any stage of that key.

        ``group``: (members, step timeout in seconds) makes it a client-batch group's stage
        (``fedsea.server.stage_groups``): its members' loads join them to one shared trunk
        session. Run it on the compute thread (a replaced group's session is closed).

        Returns: how many tensors were staged.

        Raises:
            InvalidInputError: a bad key, no tensors, or a tensor name that is no trunk block's.
            LimitExceededError: ``max_stages``, ``max_adapter_bytes`` or ``max_staged_bytes``.
        """
        check_stage_key(key)
        if group is not None:  # before anything is stored: a bad group leaves no stage behind
            check_group(*group)
        if not state:
            raise InvalidInputError("stage", "no tensors")
        for name in state:
            found = TRUNK_KEY.match(name)
            if found is None or int(found.group(1)) >= self.host.num_layers:
                raise InvalidInputError(
                    f"stage[{name[:200]}]", f"not a tensor of block 0..{self.host.num_layers - 1} ('layers.N....')"
                )
        size = state_bytes(state)
        self._check_size(size, f"stage {key!r}")
        with self._lock:
            old = self._stages.get(key)
            if old is None and len(self._stages) >= self.limits.max_stages:
                raise LimitExceededError(
                    f"stage {key!r}: {len(self._stages)} stages are held (max_stages={self.limits.max_stages}); "
                    "collect an old one with drop first"
                )
            self._reserve(size - (old.bytes if old is not None else 0), f"stage {key!r}")
            self._stages[key] = _Held(dict(state), size)
            self._forget_starts(key)  # they referenced the old stage's tensors
        with self.host.computing():  # the compute lock, then the groups (a replaced group's session closes)
            if group is not None:
                self.groups.declare(key, *group)
            else:
                self.groups.forget(key)
        return len(state)

    def collect(self, key: str, client_ids: Sequence[str] = ()) -> dict[str, State]:
        """The states published under ``key`` by ``client_ids`` (all, if empty); an id that published none is absent."""
        check_stage_key(key)
        now = time.monotonic()
        if key in self.groups:  # the group's shared adapter, once (run on the compute thread)
            self._stage(key)
            with self.host.computing():
                shared = self.groups.adapter(key)
            return {} if shared is None else {GROUP_OWNER: shared}
        with self._lock:
            wanted = set(client_ids)
            found = {c: held for (k, c), held in self._published.items() if k == key and (not wanted or c in wanted)}
            for held in found.values():
                held.last_used = now
            return {client: held.state for client, held in sorted(found.items())}

    def drop(self, key: str, client_ids: Sequence[str] | None = None) -> None:
        """Free the states published under ``key`` by ``client_ids`` (all, if None) and the stage ``key``."""
        check_stage_key(key)
        with self._lock:
            wanted = None if client_ids is None else set(client_ids)
            for k, client in [p for p in self._published if p[0] == key and (wanted is None or p[1] in wanted)]:
                self._held -= self._published.pop((k, client)).bytes
            stage = self._stages.pop(key, None)
            if stage is not None:
                self._held -= stage.bytes
            self._forget_starts(key)
        with self.host.computing():
            self.groups.forget(key)

    # -- a client's session ------------------------------------------------------------------------
    def load(self, owner: str, session_id: str, key: str) -> int:
        """Load the session's trunk blocks from stage ``key`` into its trunk adapter (its optimizer restarts).

        Strict: every tensor of the session's trunk adapter must be in the stage with its shape.
        Run it on the compute thread. Returns how many tensors were loaded.

        Raises:
            SessionNotFoundError, StageNotFoundError: NOT_FOUND.
            InvalidInputError: ``stage[name]`` for the first tensor missing from the stage or mis-shaped.
        """
        check_stage_key(key)
        with self.host.computing():
            session = self.host.get(owner, session_id)
            held = self._stage(key)
            if key in self.groups:  # a client-batch group's stage: the session joins the group
                return self.groups.join(owner, session_id, key, held.state)
            params = adapter_parameters(session.trunk, session.adapter_name)  # global keys, the blocks' views
            part: State = {}
            for name in sorted(params):
                value = held.state.get(name)
                if value is None:
                    raise InvalidInputError(
                        f"stage[{name}]",
                        f"missing from stage {key!r}, which must hold every tensor of the session's trunk blocks "
                        f"[{session.trunk.start}, {session.trunk.end})",
                    )
                if tuple(value.shape) != tuple(params[name].shape):
                    raise InvalidInputError(
                        f"stage[{name}]", f"expected shape {tuple(params[name].shape)}, got {tuple(value.shape)}"
                    )
                part[name] = value  # a reference: the stage's bytes are counted once
            count = self.host.put_adapter(owner, session_id, part)
            with self._lock:
                if self._stages.get(key) is held:  # not replaced or dropped meanwhile
                    self._starts[session.id] = (key, part)
            return count

    def publish(self, owner: str, session_id: str, key: str) -> int:
        """Copy the session's trunk adapter (global keys) into the published states under (``key``, ``owner``).

        The stage ``key`` must exist (NOT_FOUND otherwise: the round is over or unknown); a
        republish replaces the client's earlier state. Returns how many tensors were published.
        """
        check_stage_key(key)
        self._stage(key)  # NOT_FOUND before any copy
        if key in self.groups:  # the group's adapter is collected once, as the group's
            raise InvalidInputError(
                "publish", f"{key!r} is a client-batch group's stage: its shared trunk adapter is collected as a whole"
            )
        state = self.host.get_adapter(owner, session_id)  # a CPU copy, under the compute lock
        size = state_bytes(state)
        self._check_size(size, f"published trunk adapter of {owner!r}")
        with self._lock:
            if key not in self._stages:
                raise StageNotFoundError(f"no stage {key!r} (dropped while the adapter was copied)")
            old = self._published.get((key, owner))
            self._reserve(size - (old.bytes if old is not None else 0), f"published trunk adapter of {owner!r}")
            self._published[(key, owner)] = _Held(state, size)
        return len(state)

    def _stage(self, key: str) -> _Held:
        """The stage ``key``, marked used; NOT_FOUND if there is none."""
        with self._lock:
            held = self._stages.get(key)
            if held is None:
                raise StageNotFoundError(f"no stage {key!r} on this server (never staged, dropped or expired)")
            held.last_used = time.monotonic()
            return held

    # -- expiry ----------------------------------------------------------------------------------
    def reap_idle(self, now: float | None = None) -> list[str]:
        """Free stages and published states unused for ``idle_timeout_s`` (a stage with an open session that
        loaded it is in use); return what went, as ``stage KEY`` and ``published KEY CLIENT``."""
        now = time.monotonic() if now is None else now
        idle = self.limits.idle_timeout_s
        gone: list[str] = []
        with self.host.computing():  # the groups' sessions are checked (and closed) under the compute lock
            with self._lock:
                loaded = {key for key, _ in self._starts.values()} | {k for k in self._stages if self.groups.in_use(k)}
                for key in [k for k, h in self._stages.items() if now - h.last_used > idle and k not in loaded]:
                    self._held -= self._stages.pop(key).bytes
                    gone.append(f"stage {key}")
            for item in gone:
                self.groups.forget(item.removeprefix("stage "))
        with self._lock:
            for key, client in [p for p, h in self._published.items() if now - h.last_used > idle]:
                self._held -= self._published.pop((key, client)).bytes
                gone.append(f"published {key} {client}")
        return gone

    def _forget_starts(self, key: str) -> None:
        """Forget the starting points loaded from stage ``key`` (call with the lock held)."""
        for session_id in [s for s, (k, _) in self._starts.items() if k == key]:
            del self._starts[session_id]

    def _session_dropped(self, session: Session) -> None:
        with self._lock:
            self._starts.pop(session.id, None)
