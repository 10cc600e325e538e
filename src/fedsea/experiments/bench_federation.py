"""``fedsea bench federation``: quality against centralized, and hierarchical against sequential."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedsea.federation.simulate import simulate


def _rounds_seconds(run_dir: str) -> float:
    records = [json.loads(x) for x in (Path(run_dir) / "server_rounds.jsonl").read_text().splitlines() if x.strip()]
    seconds: float = sum(r["seconds"] for r in records)
    return seconds


def speed(
    model: str, batch: int, tokens: int, clients: int, latency_ms: float, mbps: float, steps: int
) -> dict[str, Any]:
    """Wall time of the rounds (server-measured) for the same samples: sequential vs hierarchical."""
    out: dict[str, Any] = {}
    for mode in ("sequential", "hierarchical"):
        with tempfile.TemporaryDirectory(prefix="fedsea-bench-") as tmp:
            overrides = [
                f'model.source="{model}"',
                'task.name="sst2"',
                f"task.train_limit={max(64, clients * batch * 4)}",
                "task.eval_limit=1",
                f"federation.clients={clients}",
                "federation.rounds=1",
                f"federation.local_steps={steps}",
                f'federation.mode="{mode}"',
                f"client.batch_size={batch}",
                f"client.max_length={tokens}",
                "client.head_layers=1",
                "client.tail_layers=1",
                f"wire.latency_ms={latency_ms}",
                f"wire.mbps={mbps}",
                "noise.sigma=0.0",
            ]
            simulate(_base_file(tmp), overrides, run_dir=f"{tmp}/run", progress=False)
            out[mode] = _rounds_seconds(f"{tmp}/run")
    return {
        "sequential_s": round(out["sequential"], 2),
        "hierarchical_s": round(out["hierarchical"], 2),
        "speedup": round(out["sequential"] / out["hierarchical"], 2),
    }


def _base_file(tmp: str) -> str:
    path = Path(tmp) / "base.toml"
    path.write_text("")
    return str(path)


# Per task: (rounds, local steps, tokens kept per training sequence; prompts are cut from the
# left beyond it). sst2's snippets fit in 128 tokens and need ~100 local steps per client to
# converge; RTE's pairs run to ~190 tokens (2.5x the cost per step), and the 135M model stays
# near chance on it whatever the budget, so it gets a smaller one (2 CPU cores, see BENCHMARKS.md).
QUALITY_BUDGET: dict[str, tuple[int, int, int]] = {
    "sst2": (4, 25, 128),
    "rte": (3, 12, 192),
    "boolq": (3, 12, 256),
}


def quality(
    model: str,
    task: str,
    rounds: int | None = None,
    local_steps: int | None = None,
    eval_limit: int = 300,
    sigma: float = 0.5,
    train_limit: int = 2000,
    engine: str = "native",
) -> dict[str, Any]:
    """3 clients (IID shards, hierarchical, noise sigma on h_p) against centralized LoRA on the
    union of their data with the same budget (rounds x local steps x clients steps of the same
    batch size, from the same LoRA initialisation); the gap in points. Budget: ``QUALITY_BUDGET``.
    ``engine``: ``native`` (fedsea's coordinator) or ``flower`` (Flower's Simulation Engine)."""
    default_rounds, default_steps, max_length = QUALITY_BUDGET.get(task, (4, 25, 128))
    rounds = rounds or default_rounds
    local_steps = local_steps or default_steps
    tmp = tempfile.mkdtemp(prefix="fedsea-bench-quality-")  # kept on failure: the clients' logs are there
    overrides = [
        f'model.source="{model}"',
        f'task.name="{task}"',
        f"task.train_limit={train_limit}",
        f"task.eval_limit={eval_limit}",
        f"federation.rounds={rounds}",
        f"federation.local_steps={local_steps}",
        f"noise.sigma={sigma}",
        f"client.max_length={max_length}",
        # Quality, not speed: a slow (shared) machine must not drop clients from rounds.
        "federation.round_timeout_s=7200",
    ]
    if engine == "flower":
        from fedsea.flower.simulation import simulate_on_flower

        summary = simulate_on_flower(_base_file(tmp), overrides, run_dir=f"{tmp}/run", centralized=True)
    elif engine == "native":
        summary = simulate(
            _base_file(tmp), overrides, run_dir=f"{tmp}/run", centralized=True, progress=False, eval_every_round=False
        )
    else:
        raise ValueError(f"unknown engine {engine!r}: native or flower")
    shutil.rmtree(tmp, ignore_errors=True)
    central, fed = float(summary["centralized"]), float(summary["after"])
    return {
        "task": task,
        "engine": engine,
        "metric": summary["metric"],
        "before": summary["before"],
        "central_acc": central,
        "fed_acc": fed,
        "gap_points": round(100 * (central - fed), 2),
        "sigma": sigma,
        "overrides": overrides,
    }


def bench_federation(
    parts: tuple[str, ...] = ("speed", "quality"),
    quality_tasks: tuple[str, ...] = ("sst2", "rte"),
    model: str = "smollm2-135m",
    engines: tuple[str, ...] = ("native",),
    run_file: str | None = None,
    overrides: tuple[str, ...] = (),
    keep: str | None = None,
) -> dict[str, Any]:
    """Print-ready dict with at least ``central_acc``, ``fed_acc``, ``gap_points``, ``hier_vs_seq_speedup``
    (tiny model) and ``hier_vs_seq_speedup_smollm2``.

    Part ``quality`` runs on each of ``engines`` (``native``, ``flower``); part ``engines`` runs
    ``run_file`` (default: ``make demo``'s) with ``overrides`` on each of ``engines`` and puts
    them side by side (``fedsea.experiments.bench_engines``), its run folders kept under ``keep`` if given."""
    result: dict[str, Any] = {"bench": "federation"}
    if "speed" in parts:
        tiny = speed("tiny-llama", batch=4, tokens=64, clients=4, latency_ms=20, mbps=100, steps=8)
        smol = speed(model, batch=1, tokens=64, clients=4, latency_ms=20, mbps=100, steps=4)
        result.update(
            hier_vs_seq_speedup=tiny["speedup"],
            speed_tiny=tiny,
            hier_vs_seq_speedup_smollm2=smol["speedup"],
            speed_smollm2=smol,
        )
    if "quality" in parts:
        rows = []
        for task in quality_tasks:  # each row to stderr as it lands: a long run keeps what it measured
            for engine in engines:
                rows.append(quality(model, task, engine=engine))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        result["quality"] = rows
        result.update(central_acc=rows[0]["central_acc"], fed_acc=rows[0]["fed_acc"], gap_points=rows[0]["gap_points"])
    if "engines" in parts:
        from fedsea.experiments.bench_engines import compare_engines

        result["engines"] = compare_engines(engines, run_file, overrides, keep)
    return result
