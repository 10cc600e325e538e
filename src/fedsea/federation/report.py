"""A run's ``metrics.jsonl``, ``report.md`` and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedsea.federation.simconfig import RunPlan
from fedsea.io import atomic_write_text
from fedsea.privacy.calibration import Calibration


def noise_record(calibration: Calibration, head_layers: int) -> dict[str, Any]:
    """What a client logs of its resolved noise (read back into the run's report)."""
    return {"head_layers": head_layers, **calibration.to_dict()}


def _regularizer(plan: RunPlan) -> str:
    if plan.head_regularizer == "none":
        return "none"
    return f"{plan.head_regularizer} (weight {plan.regularizer_weight:g})"


def noise_level(plan: RunPlan) -> str:
    """The run file's noise level in words."""
    target = plan.noise
    if target.mode == "relative":
        return f"relative_sigma {target.relative_sigma:g} (sigma = that x RMS of h_p on public text, per client)"
    if target.mode == "dp":
        return f"epsilon {target.epsilon:g} at delta {target.delta:g} (clip norm {target.clip_norm:g})"
    return f"sigma {target.sigma:g} (std of the Gaussian on h_p)"


def _parse_line(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        pass
    # A record torn by a kill mid-write has no newline: the next process's first record was
    # appended to it. Keep that record (the first "{" from which the rest of the line parses).
    start = line.find("{", 1)
    while start != -1:
        try:
            return json.loads(line[start:])
        except ValueError:
            start = line.find("{", start + 1)
    return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL log, one per line; torn records (a process killed mid-write) skipped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        record = _parse_line(line)
        if isinstance(record, dict):
            records.append(record)
    return records


def client_records(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None, int]:
    """One client's ``steps.jsonl`` as (steps, traffic per round, last noise record, bytes moved).

    The log is appended by every ``fedsea join`` process of the run (one more per ``--resume``),
    each starting with its noise record. A step or round played again after a resume counts once
    (the last record of each (round, step) and each round wins). The bytes are those of every
    process: its final record's totals, or for a process killed before writing it, its totals
    as of its last finished round (``total_sent``/``total_received``; older logs: the sum of
    its rounds' traffic). What a killed process moved after its last finished round is not known.
    """
    steps: dict[tuple[int, int], dict[str, Any]] = {}
    traffic: dict[int, dict[str, Any]] = {}
    noise: dict[str, Any] | None = None
    moved, segment, closed = 0, 0, True
    for record in read_jsonl(path):
        if "noise" in record:  # a new process
            moved += 0 if closed else segment
            noise, segment, closed = record["noise"], 0, False
        elif record.get("final"):
            moved += int(record["bytes_sent"]) + int(record["bytes_received"])
            segment, closed = 0, True
        elif "loss" in record:
            steps[(int(record["round"]), int(record["step"]))] = record
        elif "bytes_sent" in record:
            traffic[int(record["round"])] = record
            if "total_sent" in record:  # the process's running totals (join, downloads included)
                segment = int(record["total_sent"]) + int(record.get("total_received", 0))
            else:
                segment += int(record["bytes_sent"]) + int(record.get("bytes_received", 0))
    moved += 0 if closed else segment
    return [steps[k] for k in sorted(steps)], [traffic[k] for k in sorted(traffic)], noise, moved


def round_traffic(rounds: list[dict[str, Any]], client: str) -> list[dict[str, Any]]:
    """A client's traffic per round as the server recorded it (a round record's ``traffic``:
    name -> [bytes sent, bytes received], the client's data-plane bytes as its reply reported)."""
    out = []
    for r in rounds:
        moved = (r.get("traffic") or {}).get(client)
        if moved is not None:
            out.append({"client": client, "round": int(r["round"]), "bytes_sent": int(moved[0]),
                        "bytes_received": int(moved[1])})  # fmt: skip
    return out


def _eval_rows(plan: RunPlan, metric: str) -> str:
    """What the evaluation scored: the clients' held-out rows, or the task's first eval_limit rows."""
    if metric.startswith("heldout_loss"):
        return f"each client's held-out rows, the last {plan.config.task.holdout:.0%} of its file"
    return f"{plan.config.task.eval_limit or 'all'} rows of {plan.config.task.name}"


def _main_metric(record: dict[str, Any]) -> tuple[str, float]:
    for key in ("accuracy", "f1", "rougeL", "rouge_l", "exact_match", "em"):
        if key in record:
            return key, float(record[key])
    numeric = [(k, v) for k, v in record.items() if isinstance(v, float) and k not in ("round",)]
    return numeric[0] if numeric else ("metric", float("nan"))


def eval_figure(evals: list[dict[str, Any]], central: float | None = None) -> Any:
    """The eval metric per round (integer rounds), with the centralized baseline as a dashed line
    when the run computed one; a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    name, _ = _main_metric(evals[0])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([e["round"] for e in evals], [_main_metric(e)[1] for e in evals], marker="o", label="federated")
    if central is not None:
        ax.axhline(central, color="gray", linestyle="--", label="centralized, same budget")
        ax.legend()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round (0 = before training)", ylabel=name, title=f"Eval {name} per round")
    fig.tight_layout()
    return fig


def plot(
    run_dir: Path,
    steps: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    traffic: list[dict[str, Any]],
    rounds: list[dict[str, Any]] | None = None,
    central: float | None = None,
) -> list[Path]:
    """Draw loss per step, eval metric (and the centralized baseline, if any) and bytes per round
    into PNGs in ``run_dir``; return their paths.

    ``rounds``: the server's round records; without ``steps`` (the clients' logs stay on their
    machines, as on Flower's Deployment Engine) the loss plot is each client's mean loss per round.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps or not rounds:
        for client in sorted({s["client"] for s in steps}):
            mine = [s for s in steps if s["client"] == client]
            ax.plot(range(1, len(mine) + 1), [s["loss"] for s in mine], label=client, linewidth=1)
        ax.set(xlabel="local step (all rounds)", ylabel="training loss", title="Loss per client per step")
    else:
        for client in sorted({c for r in rounds for c in r.get("losses", {})}):
            points = [(r["round"], r["losses"][client]) for r in rounds if r.get("losses", {}).get(client) is not None]
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=client, linewidth=1)
        ax.set(xlabel="round", ylabel="mean training loss", title="Mean loss per client per round")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    paths.append(run_dir / "loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if evals:
        fig = eval_figure(evals, central)
        paths.append(run_dir / "eval.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    if traffic:
        numbers = sorted({t["round"] for t in traffic})
        sent = [sum(t["bytes_sent"] for t in traffic if t["round"] == r) / 2**20 for r in numbers]
        received = [sum(t["bytes_received"] for t in traffic if t["round"] == r) / 2**20 for r in numbers]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar([r - 0.2 for r in numbers], sent, width=0.4, label="clients -> server")
        ax.bar([r + 0.2 for r in numbers], received, width=0.4, label="server -> clients")
        ax.set(xlabel="round", ylabel="MiB", title="Bytes moved per round (all clients)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.legend()
        fig.tight_layout()
        paths.append(run_dir / "bytes.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_report(
    plan: RunPlan,
    run_dir: Path,
    evals: list[dict[str, Any]],
    central: dict[str, Any] | None,
    info: dict[str, Any],
    seconds: float,
    lost: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Merge the logs into ``metrics.jsonl``, draw the plots, write ``report.md``; return a summary.

    ``lost``: clients that died while the run went on without them (name: how), reported.
    """
    # One record per round: a round replayed after a resume was appended again.
    rounds = list({int(r["round"]): r for r in read_jsonl(run_dir / "server_rounds.jsonl")}.values())
    steps, traffic = [], []
    noise: dict[str, dict[str, Any]] = {}
    moved = 0
    for client in plan.clients:
        log = run_dir / "clients" / client.name / "steps.jsonl"
        if not log.exists():  # a data owner's log stays on its machine: the server's round records
            mine_traffic = round_traffic(rounds, client.name)
            traffic += mine_traffic
            moved += sum(int(t["bytes_sent"]) + int(t["bytes_received"]) for t in mine_traffic)
            continue
        mine = client_records(log)
        steps += mine[0]
        traffic += mine[1]
        if mine[2] is not None:
            noise[client.name] = mine[2]
        moved += mine[3]
    lines = [json.dumps({"type": "round", **r}) for r in rounds]
    lines += [json.dumps({"type": "step", **s}) for s in steps]
    lines += [json.dumps({"type": "traffic", **t}) for t in traffic]
    lines += [json.dumps({"type": "noise", "client": c, **n}) for c, n in noise.items()]
    lines += [json.dumps(e) for e in evals]
    if central is not None:
        lines.append(json.dumps({"type": "centralized", "steps": central["steps"], **central["metrics"]}))
    atomic_write_text(run_dir / "metrics.jsonl", "\n".join(lines) + "\n")
    plots = plot(run_dir, steps, evals, traffic, rounds, _main_metric(central["metrics"])[1] if central else None)

    name, before = _main_metric(evals[0]) if evals else ("metric", float("nan"))
    after = _main_metric(evals[-1])[1] if evals else float("nan")
    fed = plan.fed
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "report": str(run_dir / "report.md"),
        # Clients on their own files: no task names the data (a mixed run still has one).
        "task": plan.config.task.name if any(c.data is None for c in plan.clients) else "own data",
        "mode": fed.mode,
        "clients": len(plan.clients),
        "rounds_completed": len(rounds),
        "metric": name,
        "before": before,
        "after": after,
        "centralized": _main_metric(central["metrics"])[1] if central else None,
        "bytes_moved": moved,
        "sigma": max((n["sigma"] for n in noise.values()), default=plan.noise.sigma or 0.0),
        "noise": noise,
        "seconds": round(seconds, 1),
        "lost_clients": dict(lost or {}),
    }
    md = [
        f"# fedsea run: {summary['task']}, {fed.mode}, {len(plan.clients)} clients",
        "",
        f"- model `{plan.model}`, LoRA {plan.lora.summary()}",
        f"- {fed.rounds} rounds x {fed.local_steps} local steps, lr {plan.optim.lr}, strategy {fed.strategy}",
        f"- noise {noise_level(plan)}, clip norm {plan.noise.clip_norm or 'none'}; head regularizer "
        f"{plan.head_regularizer}"
        + (f" (weight {plan.regularizer_weight:g})" if plan.head_regularizer != "none" else ""),
        f"- wire {plan.wire_dtype} (compression {plan.config.wire.compression}), TLS {'on' if plan.tls else 'off'}; "
        f"took {summary['seconds']} s",
        "",
        "| client | head p | tail q | batch | noise on h_p |",
        "|---|---|---|---|---|",
        *[
            f"| {c.name} | {c.head_layers} | {c.tail_layers} | {c.batch_size} | "
            f"{noise[c.name]['summary'] if c.name in noise else '-'} |"
            for c in plan.clients
        ],
        "",
        "## Data partition",
        "",
        "```",
        str(info.get("partition", "")),
        "```",
        "",
        f"## Evaluation ({name}, {_eval_rows(plan, name)})",
        "",
        "| round | " + name + " |",
        "|---|---|",
        *[f"| {e['round']} | {_main_metric(e)[1]:.4f} |" for e in evals],
    ]
    if central is not None:
        md += [
            "",
            f"Centralized LoRA on the union of the clients' data, same budget ({central['steps']} steps): "
            f"**{summary['centralized']:.4f}** ({name}); federated after the last round: **{after:.4f}**.",
        ]
    md += [
        "",
        "## Rounds",
        "",
        "| round | submitted | dropped | mean loss | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in rounds:
        losses = [v for v in r["losses"].values() if v is not None]
        mean = sum(losses) / len(losses) if losses else float("nan")
        dropped = ", ".join(r["dropped"]) or "-"
        md.append(f"| {r['round']} | {len(r['submitted'])} | {dropped} | {mean:.4f} | {r['seconds']:.1f} |")
    md += ["", f"Bytes moved by all clients, both ways: {moved / 2**20:.1f} MiB.", ""]
    if lost:
        who = ", ".join(f"{name} ({how})" for name, how in lost.items())
        md += [f"**Lost during the run:** {who}; the run finished with the other clients.", ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    atomic_write_text(run_dir / "report.md", "\n".join(md) + "\n")
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
