"""A client's ``steps.jsonl`` read back for the report: one record per step and round, bytes of every process."""

from __future__ import annotations

import json

from fedsea.federation.report import client_records


def _log(path, *records):
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_a_killed_process_counts_its_rounds_and_a_replayed_round_counts_once(tmp_path):
    log = tmp_path / "steps.jsonl"
    noise = {"client": "c", "noise": {"sigma": 0.1}}
    step = lambda r, s, loss: {"client": "c", "round": r, "step": s, "loss": loss}  # noqa: E731
    traffic = lambda r, n: {"client": "c", "round": r, "samples": 4, "bytes_sent": n, "bytes_received": n}  # noqa: E731
    # The first process finished round 1, was killed in round 2 (no final record) ...
    _log(log, noise, step(1, 0, 5.0), step(1, 1, 4.0), traffic(1, 100), step(2, 0, 3.0))
    log.write_text(log.read_text() + '{"client": "c", "ro')  # ... mid-write
    # ... and the resumed process played round 2 again and round 3, then wrote its totals.
    _log(log, noise, step(2, 0, 2.5), step(2, 1, 2.0), traffic(2, 10), step(3, 0, 1.0), step(3, 1, 0.5))
    _log(log, traffic(3, 10), {"client": "c", "final": True, "bytes_sent": 30, "bytes_received": 30})
    steps, rounds, last_noise, moved = client_records(log)
    assert [(s["round"], s["step"], s["loss"]) for s in steps] == [
        (1, 0, 5.0), (1, 1, 4.0), (2, 0, 2.5), (2, 1, 2.0), (3, 0, 1.0), (3, 1, 0.5)
    ]  # fmt: skip
    assert [r["round"] for r in rounds] == [1, 2, 3] and last_noise == {"sigma": 0.1}
    # The killed process's finished round (200 bytes) and the resumed process's totals (60).
    assert moved == 200 + 60


def test_a_killed_process_counts_its_running_totals_when_logged(tmp_path):
    log = tmp_path / "steps.jsonl"
    noise = {"client": "c", "noise": {"sigma": 0.1}}
    record = {"client": "c", "round": 1, "samples": 4, "bytes_sent": 100, "bytes_received": 100}
    _log(log, noise, {**record, "total_sent": 150, "total_received": 170}, noise)
    _log(log, {"client": "c", "final": True, "bytes_sent": 30, "bytes_received": 30})
    assert client_records(log)[3] == 150 + 170 + 60
