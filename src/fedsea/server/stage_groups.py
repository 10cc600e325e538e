"""Client-batch groups of a Flower run: stages whose clients train one shared trunk adapter.

A Flower run in ``client-batch`` mode stages each round's global trunk adapter once per trunk
range of its clients, with the group's members (``StageTrunk``'s ``group``). A member's
``LoadStagedTrunk`` then does not load its own session: it makes the session a member of the
group, whose shared session (owned by ``GROUP_OWNER``, opened at the first member's load from
the stage's tensors of its trunk blocks) the members' steps train together through one
``GroupBatcher``, as the native coordinator's groups do (``fedsea.federation.groups``). The
operator's ``CollectTrunk`` of the stage returns the group's adapter once, under
``GROUP_OWNER``; dropping the stage closes the shared session.

The members are named by the operator in the joint pass's row order, so the rows (and the
float sums of the shared adapter's gradient) do not depend on who loaded first. A member that
has not loaded when a step's ``step_timeout_s`` runs out is left out of the group for the rest
of the round; its later load is refused, naming the group.

Locks: everything here runs on the compute thread under the host's compute lock (``load``,
``collect``, ``drop`` of ``TrunkStaging``), except ``batcher_for``, which reads a dict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedsea.errors import InvalidInputError, SessionNotFoundError
from fedsea.model.adapters import adapter_parameters
from fedsea.server.batching import GROUP_OWNER, GroupBatcher, Member
from fedsea.server.trunk import Session, TrunkHost

State = dict[str, torch.Tensor]


@dataclass
class StagedGroup:
    """A group stage's members, its step timeout, and once a member loaded, its shared session."""

    members: list[str]
    step_timeout_s: float
    batcher: GroupBatcher | None = None
    closed: bool = False  # its shared session closed (expired): the group is over


def check_group(members: list[str], step_timeout_s: float) -> None:
    """Refuse an empty or repeated member list or a timeout that is not positive (INVALID_ARGUMENT)."""
    if not members:
        raise InvalidInputError("group.members", "a client-batch group needs at least one member")
    if len(set(members)) != len(members):
        raise InvalidInputError("group.members", f"names a client twice: {', '.join(members)}")
    if not step_timeout_s > 0:
        raise InvalidInputError("group.step_timeout_s", f"must be > 0, got {step_timeout_s}")


class StageGroups:
    """The group stages of one trunk server (stage key -> ``StagedGroup``).

    Args:
        host: the trunk host (sessions, the compute lock).
        compute: runs a blocking call on the compute thread and returns its result (the
            servicer's ``run_blocking``), for the groups' joint passes.
    """

    def __init__(self, host: TrunkHost, compute: Callable[..., Awaitable[Any]] | None = None) -> None:
        self.host = host
        self.compute = compute
        self._groups: dict[str, StagedGroup] = {}
        host.on_drop.append(self._session_dropped)

    def __contains__(self, key: str) -> bool:
        return key in self._groups

    def declare(self, key: str, members: list[str], step_timeout_s: float) -> None:
        """Make stage ``key`` a group of ``members`` (replacing any group of that key: its session closes)."""
        check_group(members, step_timeout_s)
        self.forget(key)
        self._groups[key] = StagedGroup(list(members), float(step_timeout_s))

    def join(self, owner: str, session_id: str, key: str, stage: Mapping[str, torch.Tensor]) -> int:
        """Make the caller's session a member of the group of stage ``key``; returns the group's trunk tensors.

        The first member opens the shared session (its LoRA, its trunk range) and loads it from
        ``stage`` (strict: every tensor of the trunk blocks, shaped right). Call it on the
        compute thread, with the host's compute lock held.

        Raises:
            InvalidInputError: the caller is no member, was left out, or cuts or adapts otherwise
                than the group's first member.
        """
        group = self._groups[key]
        session = self.host.get(owner, session_id)
        if owner not in group.members:
            raise InvalidInputError(
                "stage", f"{key!r} is a client-batch group of {', '.join(group.members)}; {owner!r} is not one of them"
            )
        batcher = group.batcher
        if batcher is None:
            if self.compute is None:
                raise InvalidInputError("stage", f"{key!r}: this server cannot run client-batch groups")
            batcher = group.batcher = self._open(key, group, session, stage)
        shared = batcher.group
        if (session.trunk.start, session.trunk.end) != (shared.trunk.start, shared.trunk.end):
            raise InvalidInputError(
                "stage",
                f"{key!r}: the group trains trunk blocks [{shared.trunk.start}, {shared.trunk.end}); this "
                f"session's trunk is [{session.trunk.start}, {session.trunk.end}) (a group per cut (p, q))",
            )
        if session.spec.lora != shared.spec.lora:
            raise InvalidInputError(
                "stage",
                f"{key!r}: the session's trunk LoRA {session.spec.lora} differs from the group's {shared.spec.lora}",
            )
        if not batcher.waits_for(owner):
            raise InvalidInputError(
                "stage",
                f"{key!r}: the client-batch group went on without {owner!r} (it came later than one step's "
                f"timeout, {group.step_timeout_s:.0f} s, or had joined already)",
            )
        batcher.bind(owner, session_id)
        return len(adapter_parameters(shared.trunk, shared.adapter_name))

    def _open(self, key: str, group: StagedGroup, session: Session, stage: Mapping[str, torch.Tensor]) -> GroupBatcher:
        """The group's shared session: the first member's spec (seed 0), loaded from the stage."""
        assert self.compute is not None
        shared = self.host.open_session(GROUP_OWNER, self.host.fingerprint, replace(session.spec, seed=0))
        try:
            params = adapter_parameters(shared.trunk, shared.adapter_name)
            part: State = {}
            for name in sorted(params):
                value = stage.get(name)
                if value is None or tuple(value.shape) != tuple(params[name].shape):
                    raise InvalidInputError(
                        f"stage[{name}]",
                        f"missing from stage {key!r} or not of shape {tuple(params[name].shape)}: the stage must "
                        f"hold every tensor of the group's trunk blocks [{shared.trunk.start}, {shared.trunk.end})",
                    )
                part[name] = value
            self.host.put_adapter(GROUP_OWNER, shared.id, part)
        except Exception:
            self.host.close_session(GROUP_OWNER, shared.id)
            raise
        members: list[Member] = [(m, None) for m in group.members]  # each bound at its load
        return GroupBatcher(self.host, shared, members, self.compute, group.step_timeout_s)

    def batcher_for(self, owner: str, session_id: str) -> GroupBatcher | None:
        """The group this session trains in, if it is an active member of one."""
        for group in list(self._groups.values()):
            if group.batcher is not None and group.batcher.has(owner, session_id):
                return group.batcher
        return None

    def adapter(self, key: str) -> State | None:
        """A copy of the group's shared trunk adapter (global keys); None before any member loaded."""
        group = self._groups.get(key)
        if group is None or group.batcher is None:
            return None
        return self.host.get_adapter(GROUP_OWNER, group.batcher.group.id)

    def in_use(self, key: str) -> bool:
        """Whether stage ``key`` is a group whose shared session is open (its stage must not expire)."""
        group = self._groups.get(key)
        return group is not None and group.batcher is not None and not group.closed

    def _session_dropped(self, session: Session) -> None:
        """A closed session leaves its group: the shared one ends it; a member's no longer holds up the steps."""
        for group in self._groups.values():
            batcher = group.batcher
            if batcher is None:
                continue
            if session.owner == GROUP_OWNER and session.id == batcher.group.id:
                group.closed = True
            elif any(s == session.id for _, s in batcher.active):
                batcher.active = [m for m in batcher.active if m[1] != session.id]

    def forget(self, key: str) -> None:
        """Forget the group of stage ``key`` and close its shared session (nothing if there is none)."""
        group = self._groups.pop(key, None)
        if group is not None and group.batcher is not None and not group.closed:
            with contextlib.suppress(SessionNotFoundError):  # expired already
                self.host.close_session(GROUP_OWNER, group.batcher.group.id)
