"""Client-batch mode's shared trunk sessions: one per trunk range among a round's clients.

The clients of a group train one trunk adapter together (their batches joined into one trunk
pass per step), so at the round's end that adapter is checked as a whole: a bad one is left out
of the average, and it is no single client's fault.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch

from fedsea.errors import InvalidInputError, SessionNotFoundError
from fedsea.federation.validation import check_update
from fedsea.server.batching import GROUP_OWNER, GroupBatcher
from fedsea.server.trunk import Session, TrunkHost


def trunk_part(state: Mapping[str, torch.Tensor], session: Session) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` (keyed ``layers.N....``) in the session's trunk blocks."""
    trunk = session.trunk
    return {k: v for k, v in state.items() if trunk.start <= int(k.split(".")[1]) < trunk.end}


async def open_groups(
    host: TrunkHost,
    sessions: Mapping[str, str],
    global_state: Mapping[str, torch.Tensor],
    compute: Callable[..., Any],
    timeout_s: float,
) -> list[tuple[GroupBatcher, list[str], str]]:
    """One shared trunk session, loaded from ``global_state``, per trunk range of ``sessions`` (client: session id).

    Returns:
        (batcher, its clients, the shared session's id) per group, in trunk-range order.
    """
    by_range: dict[tuple[int, int], list[str]] = {}
    for client_id, session_id in sessions.items():
        session = host.get(client_id, session_id)
        by_range.setdefault((session.trunk.start, session.trunk.end), []).append(client_id)
    groups = []
    for (start, end), clients in sorted(by_range.items()):
        template = host.get(clients[0], sessions[clients[0]]).spec
        spec = replace(template, head_layers=start, tail_layers=host.num_layers - end, seed=0)
        group = await compute(host.open_session, GROUP_OWNER, host.fingerprint, spec)
        await compute(host.put_adapter, GROUP_OWNER, group.id, trunk_part(global_state, group))
        batcher = GroupBatcher(host, group, [(c, sessions[c]) for c in clients], compute, timeout_s)
        groups.append((batcher, clients, group.id))
    return groups


async def close_group(
    host: TrunkHost,
    group_id: str,
    global_state: Mapping[str, torch.Tensor],
    compute: Callable[..., Any],
    max_rms: float | None,
) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """Read a group's trunk adapter, check it against ``global_state`` and close the session.

    Returns:
        (the adapter, None), or (None, why it was refused).
    """
    try:
        state = await compute(host.get_adapter, GROUP_OWNER, group_id)
        start = trunk_part(global_state, host.get(GROUP_OWNER, group_id))
        await compute(check_update, state, start, "trunk adapter", max_rms)
        return state, None
    except InvalidInputError as exc:
        return None, str(exc)
    finally:
        await compute(host.close_session, GROUP_OWNER, group_id)


async def discard_groups(host: TrunkHost, group_ids: list[str], compute: Callable[..., Any]) -> None:
    """Close the groups' sessions that are still open (after a round that failed half-way)."""
    for group_id in group_ids:
        with contextlib.suppress(SessionNotFoundError):  # closed already, the usual case
            await compute(host.close_session, GROUP_OWNER, group_id)
