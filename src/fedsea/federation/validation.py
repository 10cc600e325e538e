"""Checks on every adapter a federated run averages, and the fault count that bans a client.

A client's head/tail update (``SubmitUpdate``) and every trunk adapter the server reads from a
session it does not train itself (each client drives its trunk adapter's steps, and may also
overwrite it with ``PutTrunkAdapter``) pass ``check_update`` before they reach the strategy:
exactly the expected keys, each with the global tensor's shape, a floating-point dtype, finite
values, and a change from the state the party started from of at most ``max_update_rms``.

The bound is on the root-mean-square change per element of each tensor,
``||x - x0||_2 / sqrt(numel)``: unlike the plain L2 norm it does not grow with the tensor's size, so
one default serves a rank-4 adapter of the tiny model and a rank-64 one of a 7B model. Why 10 is
far from any honest update: an AdamW step moves each element by at most about
``lr * (1 - beta1) / sqrt(1 - beta2)`` (~ 3.2 lr at betas 0.9/0.999; ~ lr in practice), so a round
of ``local_steps`` steps moves each element by at most ~ 3.2 lr * local_steps: 0.032 at the run
file's defaults (lr 1e-3, 10 steps), 3.2 at lr 1e-2 and 100 steps. A LoRA tensor is itself of
order 1e-2 to 1 per element, so a change of RMS 10 already wrecks the model; the values of the
attacks this guards against (1e6, 3e38: overflow to Inf in the next round) are refused by far.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from fedsea.errors import BannedError, InvalidInputError

# Re-exported: their home is the torch-free fedsea.federation.constants (see the module docstring for the bound).
from fedsea.federation.constants import DEFAULT_MAX_FAULTS as DEFAULT_MAX_FAULTS
from fedsea.federation.constants import DEFAULT_MAX_UPDATE_RMS as DEFAULT_MAX_UPDATE_RMS

UPDATE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
_MAX_ECHO = 80  # characters of a client-given key echoed in an error


def _echo(key: str) -> str:
    """A key as it may appear in an error: client-given keys can be arbitrarily long."""
    return key if len(key) <= _MAX_ECHO else key[: _MAX_ECHO - 3] + "..."


def update_rms(value: torch.Tensor, start: torch.Tensor) -> float:
    """Root-mean-square change per element, ``||value - start||_2 / sqrt(numel)``, in float64.

    float64, because the float32 square of a finite 3e38 overflows to Inf (the check would still
    refuse it, but the figure in the message would say ``inf``).
    """
    if value.numel() == 0:
        return 0.0
    diff = value.detach().to(torch.float64) - start.detach().to(device=value.device, dtype=torch.float64)
    return float(torch.linalg.vector_norm(diff)) / math.sqrt(value.numel())


def check_update(
    state: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    field: str,
    max_rms: float | None = DEFAULT_MAX_UPDATE_RMS,
) -> None:
    """Refuse an adapter that is not a plausible training result of ``start``.

    Args:
        state: the adapter tensors sent (or read from a session), by global key.
        start: the tensors the party started the round from, keyed exactly as ``state`` must be.
        field: how the error names the adapter, e.g. ``update`` or ``trunk adapter``.
        max_rms: bound on each tensor's RMS change per element (``update_rms``); ``None``: no bound.

    Raises:
        InvalidInputError: naming ``field[key]`` and the problem (unexpected or missing key,
            shape, dtype, NaN/Inf, change over the bound); the first problem found, keys in order.
    """
    unexpected = sorted(set(state) - set(start))
    if unexpected:
        raise InvalidInputError(
            f"{field}[{_echo(unexpected[0])}]", f"not a key of this client's adapter ({len(unexpected)} such keys)"
        )
    missing = sorted(set(start) - set(state))
    if missing:
        raise InvalidInputError(f"{field}[{missing[0]}]", f"missing ({len(missing)} of {len(start)} keys missing)")
    for key in sorted(start):
        value, reference = state[key], start[key]
        name = f"{field}[{key}]"
        if tuple(value.shape) != tuple(reference.shape):
            raise InvalidInputError(name, f"expected shape {tuple(reference.shape)}, got {tuple(value.shape)}")
        if value.dtype not in UPDATE_DTYPES:
            raise InvalidInputError(name, f"dtype {value.dtype} is not float32, bfloat16 or float16")
        if not bool(torch.isfinite(value).all()):
            raise InvalidInputError(name, "contains NaN or Inf")
        if max_rms is not None:
            rms = update_rms(value, reference)
            if not rms <= max_rms:
                raise InvalidInputError(
                    name, f"changed by RMS {rms:.3g} per element, over the bound {max_rms:g} (max_update_rms)"
                )


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The round records of ``run_dir/server_rounds.jsonl`` (none if absent; a torn last line skipped)."""
    path = run_dir / "server_rounds.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill mid-write
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class FaultBook:
    """Refused updates per client; ``max_faults`` of them ban the client from the run.

    Args:
        max_faults: refusals after which a client is banned (its ``JoinRun``, ``AwaitRound`` and
            ``SubmitUpdate`` get ``BannedError``, PERMISSION_DENIED); ``None``: never banned.
    """

    def __init__(self, max_faults: int | None = DEFAULT_MAX_FAULTS) -> None:
        if max_faults is not None and max_faults < 1:
            raise ValueError(f"max_faults must be >= 1 or None, got {max_faults}")
        self.max_faults = max_faults
        self.faults: dict[str, int] = {}
        self.banned: set[str] = set()

    def record(self, client_id: str) -> bool:
        """Count one refused update of ``client_id``; True when this one bans it."""
        self.faults[client_id] = count = self.faults.get(client_id, 0) + 1
        if self.max_faults is not None and count >= self.max_faults and client_id not in self.banned:
            self.banned.add(client_id)
            return True
        return False

    def replay(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Count the refusals of earlier rounds' records (``server_rounds.jsonl``), e.g. on a resume.

        A client-batch group's trunk adapter (``trunk:group-...``) is no client's fault.
        """
        for record in records:
            for party in record.get("refused", {}):
                if not party.startswith("trunk:group-"):
                    self.record(party)

    def check(self, client_id: str) -> None:
        """Raise ``BannedError`` if ``client_id`` is banned from the run."""
        if client_id in self.banned:
            raise BannedError(
                f"client {_echo(client_id)!r} is banned from this run after {self.faults[client_id]} refused updates"
            )
