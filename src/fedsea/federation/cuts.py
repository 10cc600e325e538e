"""Cut schedules: a client's partition points (p, q) by round, moved at round boundaries.

A run file may give a client (``[[clients]]``, or every client in ``[client]``) a schedule of
cuts, a list of ``[round, head_layers, tail_layers]`` entries in increasing round order:

    [[clients]]
    head_layers = 2
    tail_layers = 2
    cuts = [[3, 4, 1], [5, 2, 2]]   # rounds 1-2 at (2, 2), 3-4 at (4, 1), from 5 on at (2, 2)

Each entry's cut holds from its round until the next entry; before the first entry the client's
``head_layers``/``tail_layers`` hold (an entry for round 1 replaces them). A SuperNode may ask for
its own schedule in its node config (``cuts = "[[3, 4, 1]]"``, the same list as a TOML string),
which its ClientApp reports to the ServerApp (``fedsea.flower``).

Why moving a cut loses no training: the global adapter is keyed by block (``layers.N....``);
blocks leaving the client go to the trunk's part of the global adapter (staged on the trunk
server) and blocks coming back are sliced from it, so every block keeps its adapter whichever
party trains it. Two limits follow from the block-keyed average: a schedule that moves needs one
LoRA for every part (``[lora.head]``/``[lora.trunk]``/``[lora.tail]`` would change a moving
block's shape), and secure aggregation, which sums equally shaped head/tail adapters, needs one
cut for all clients in every round.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Sequence
from typing import Any

from fedsea.errors import PartitionError

Cut = tuple[int, int]
Schedule = tuple[tuple[int, int, int], ...]  # (round, head_layers, tail_layers), rounds increasing

__all__ = [
    "Cut",
    "Schedule",
    "check_run_cuts",
    "check_schedule",
    "check_schedule_model",
    "check_schedule_rounds",
    "cut_at",
    "cuts_by_round",
    "moves",
    "parse_schedule",
    "refuse_moving_cuts",
    "schedule_text",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_schedule(schedule: Sequence[Sequence[int]] | None, where: str = "cuts") -> None:
    """Refuse a malformed schedule: entries ``[round, p, q]`` of integers, round, p, q >= 1, rounds increasing.

    Raises:
        ValueError: naming ``where`` (e.g. ``client-1 cuts``), the entry and the fix.
    """
    last = 0
    for entry in schedule or ():
        if len(entry) != 3 or not all(_is_int(v) for v in entry):
            raise ValueError(f"{where} entry {list(entry)!r}: give [round, head_layers, tail_layers], three integers")
        round_number, p, q = entry
        if round_number < 1:
            raise ValueError(f"{where} entry {list(entry)!r}: round {round_number} must be >= 1 (round 1 is the first)")
        if p < 1 or q < 1:
            raise ValueError(f"{where} entry {list(entry)!r}: head_layers and tail_layers must be >= 1")
        if round_number <= last:
            raise ValueError(
                f"{where} entry {list(entry)!r}: round {round_number} comes after round {last}; list the entries "
                "once per round, in increasing round order"
            )
        last = round_number


def check_schedule_rounds(schedule: Schedule | None, rounds: int, where: str = "cuts") -> None:
    """Refuse an entry after the run's last round (it would never apply: a mistake, not a plan).

    Raises:
        ValueError: naming ``where``, the round and the run's rounds.
    """
    for round_number, p, q in schedule or ():
        if round_number > rounds:
            raise ValueError(
                f"{where} entry [{round_number}, {p}, {q}]: round {round_number} is after the run's last round "
                f"(federation.rounds = {rounds}); give rounds 1 to {rounds}, or more rounds"
            )


def check_schedule_model(schedule: Schedule | None, default: Cut, num_layers: int, where: str, model: str) -> None:
    """Refuse a cut of the schedule (or the default) that does not fit a model of ``num_layers`` blocks.

    Raises:
        PartitionError: naming ``where``, the round, the cut and the model (``check_partition``'s words).
    """
    from fedsea.model.split import check_partition

    for round_number, cut in cuts_by_round(schedule, default):
        try:
            check_partition(num_layers, *cut)
        except PartitionError as exc:
            raise PartitionError(f"{where} round {round_number} cut {cut} on {model}: {exc}") from None


def check_run_cuts(clients: Iterable[Any], rounds: int) -> None:
    """Refuse, for each client (a ``ClientPlan``), a malformed schedule or one with a round after the run's last.

    Raises:
        ValueError: naming the client, the entry and the fix.
    """
    for client in clients:
        where = f"{client.name} cuts"
        check_schedule(client.cuts, where)
        check_schedule_rounds(client.cuts, rounds, where)


def refuse_moving_cuts(clients: Iterable[Any], engine: str) -> None:
    """Refuse a schedule that moves a client's cut on an engine that keeps one cut per run.

    Args:
        clients: the run's ``ClientPlan``s.
        engine: the engine in words, e.g. ``the native engine (fedsea serve --run / join)``.

    Raises:
        ValueError: naming the client, the round it would move and the way out.
    """
    for client in clients:
        default = (client.head_layers, client.tail_layers)
        moved = [(r, cut) for r, cut in cuts_by_round(client.cuts, default) if cut != default]
        if moved:
            round_number, cut = moved[0]
            raise ValueError(
                f"{client.name} cuts moves its cut to {cut} in round {round_number}, but {engine} keeps each "
                "client's (head_layers, tail_layers) for the whole run: run it on Flower (the default engine), "
                "or drop the cuts"
            )


def cut_at(schedule: Schedule | None, default: Cut, round_number: int) -> Cut:
    """The cut of round ``round_number``: the last entry at or before it, else ``default``."""
    cut = default
    for start, p, q in schedule or ():
        if start > round_number:
            break
        cut = (p, q)
    return cut


def cuts_by_round(schedule: Schedule | None, default: Cut) -> list[tuple[int, Cut]]:
    """Every cut a client takes and the round it starts: ``[(1, default), (3, (4, 1)), ...]``."""
    out = [(1, default)]
    for start, p, q in schedule or ():
        if start == 1:
            out[0] = (1, (p, q))
        else:
            out.append((start, (p, q)))
    return out


def moves(schedule: Schedule | None, default: Cut) -> bool:
    """Whether the schedule ever takes the client away from ``default``."""
    return any(cut != default for _, cut in cuts_by_round(schedule, default))


def parse_schedule(text: str, where: str = "cuts") -> Schedule:
    """A schedule given as text (a node config value): the run file's list as TOML, ``[[3, 4, 1], [5, 2, 2]]``.

    Raises:
        ValueError: not such a list, or a malformed entry (``check_schedule``).
    """
    try:
        value = tomllib.loads(f"v = {text.strip() or '[]'}")["v"]
    except tomllib.TOMLDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(e, list) for e in value):
        raise ValueError(
            f'{where} = {text!r}: give a list of [round, head_layers, tail_layers], e.g. "[[3, 4, 1], [5, 2, 2]]"'
        )
    check_schedule(value, where)
    return tuple((int(r), int(p), int(q)) for r, p, q in value)


def schedule_text(schedule: Iterable[Sequence[int]] | None) -> str:
    """The schedule as ``parse_schedule`` reads it (``[]`` for none)."""
    return "[" + ", ".join(f"[{r}, {p}, {q}]" for r, p, q in schedule or ()) + "]"
