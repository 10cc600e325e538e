"""What the ServerApp prints of a run: one line per round, one line when the run has finished.

The lines go to the ``fedsea.flower`` loggers, which ``flwr run --stream`` shows beside Flower's
own (the ServerApp's output is streamed to whoever started the run) and which the SuperLink's
ServerApp process writes to its log. Clients are named as in the run file (``client-0``, ...):
the names of the round records, the report and ``metrics.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def round_line(record: dict[str, Any], rounds: int) -> str:
    """One round's line: clients that replied of those sampled, their mean loss, bytes moved, seconds.

    Args:
        record: the round's record (``server_rounds.jsonl``: ``submitted``, ``selected``,
            ``losses``, ``traffic`` name -> [sent, received], ``seconds``, ...).
        rounds: the run's rounds (the line says ``round 2/3``).

    Returns:
        e.g. ``round 2/3: 2/2 clients replied (client-0, client-1), mean loss 3.2114, 1.4 MiB moved, 12.3 s``
        with ``; dropped client-2`` / ``; refused client-1`` / ``; failed node 7`` when any, and
        ``; cuts client-0 (4, 1), client-1 (2, 2)`` in a run whose cut schedules move a client
        (``cuts-moved``; the record's ``cuts`` holds every round's cuts either way).
    """
    losses = [float(v) for v in (record.get("losses") or {}).values() if v is not None]
    mean = f"{sum(losses) / len(losses):.4f}" if losses else "n/a"
    moved = sum(int(s) + int(r) for s, r in (record.get("traffic") or {}).values())
    done = sorted(record.get("submitted") or [])
    line = (
        f"round {record['round']}/{rounds}: {len(done)}/{len(record.get('selected') or [])} clients replied"
        f" ({', '.join(done) or 'none'}), mean loss {mean}, {_mib(moved)} moved, {float(record['seconds']):.1f} s"
    )
    for what in ("dropped", "refused", "failed"):
        who = record.get(what) or []
        if who:
            line += f"; {what} {', '.join(sorted(who))}"
    cuts = record.get("cuts") or {}
    if record.get("cuts-moved") and cuts:  # a run whose cuts move: each client's (p, q) this round
        line += "; cuts " + ", ".join(f"{name} ({p}, {q})" for name, (p, q) in sorted(cuts.items()))
    return line


def final_line(summary: dict[str, Any]) -> str:
    """The run's last line: finished, rounds, the metric before and after, where the report is."""
    line = f"run finished: {summary['rounds_completed']} rounds, {summary['clients']} clients"
    before, after = summary.get("before"), summary.get("after")
    if isinstance(before, float) and isinstance(after, float) and before == before:  # not NaN: evaluated
        line += f", {summary['metric']} {before:.4f} -> {after:.4f}"
    line += f", {_mib(float(summary.get('bytes_moved', 0)))} moved; report {Path(summary['report'])}"
    return line


def lost_clients(run_dir: Path) -> dict[str, str]:
    """Clients whose last sampled round (``server_rounds.jsonl``) failed, and nodes whose query failed
    in the last round: name (or ``node N``) -> Flower's reason."""
    from fedsea.federation.report import read_jsonl

    path = run_dir / "server_rounds.jsonl"
    records = read_jsonl(path) if path.exists() else []
    last: dict[str, str] = {}
    for record in records:
        failed = dict(record.get("failed") or {})
        for name in record.get("selected") or []:
            last[str(name)] = str(failed.get(name, ""))
    if records:  # and a node that never told its name (its query failed, each round: "node N")
        for key, why in dict(records[-1].get("failed") or {}).items():
            last.setdefault(str(key), str(why))
    return {name: f"failed: {why}" for name, why in last.items() if why}
