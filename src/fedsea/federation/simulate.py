"""``fedsea simulate``: a trunk server and N clients as separate processes on this machine.

Everything goes over real loopback gRPC with TLS and per-client tokens, exactly as across
machines: the parent only prepares the run folder (resolved config, certificates, tokens,
data shards), starts ``fedsea serve --run`` and N ``fedsea join`` processes, follows the
rounds, and afterwards evaluates each round's global adapter and writes the report.

Faults: a client lost while the others finish every round is reported (a warning, and
``lost_clients`` in the summary and report), not an error; a server lost, or clients lost before
the last round, stop the run with a one-line ``RunStoppedError`` that says how to ``--resume``.
The run folder then keeps its checkpoints, or is removed when this invocation made it and no
round was checkpointed (``fedsea.federation.runstate``). ``pids.json`` in the run folder lists
the server's and each client's process id while the run goes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fedsea.config import Placement
from fedsea.federation.checkpoint import CheckpointError, latest_round, load_round
from fedsea.federation.data import encode_task_examples, task_examples, write_shard
from fedsea.federation.runstate import (
    RunStoppedError,
    after_failure,
    check_plan,
    clear_failed,
    completed_round,
    drop_unfinished_steps,
    exit_reason,
)
from fedsea.federation.simconfig import RunPlan, dump_tree, load_config, load_plan
from fedsea.io import atomic_write_text
from fedsea.wire.ports import free_loopback_port

FEDSEA = [sys.executable, "-m", "fedsea.cli"]


def prepare_run(plan: RunPlan, run_dir: Path) -> dict[str, Any]:
    """Resolved config, certificates, tokens and one data shard per client."""
    from fedsea import tasks
    from fedsea.wire.auth import TokenStore
    from fedsea.wire.certs import make_test_certs

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", dump_tree(plan.tree))
    secrets = run_dir / "secrets"
    if plan.tls:
        make_test_certs(secrets)
    store = TokenStore()
    tokens = {c.name: store.add(c.name) for c in plan.clients}
    store.save(secrets / "tokens.json")
    atomic_write_text(secrets / "client_tokens.json", json.dumps(tokens))
    (secrets / "client_tokens.json").chmod(0o600)
    t = plan.config.task
    examples = task_examples(t.name, t.train_split, t.train_limit)
    labels = [e.label if e.label is not None else 0 for e in examples]
    part = tasks.partition(labels, num_clients=len(plan.clients), scheme=t.partition, alpha=t.alpha, seed=plan.fed.seed)
    for client, indices in zip(plan.clients, part.clients, strict=True):
        write_shard(
            run_dir / "clients" / client.name / "shard.json",
            t.name,
            t.train_split,
            [examples[i].id for i in indices],
            t.train_limit,
        )
    choices = list(examples[0].choices) if examples and examples[0].choices else None
    table = part.table(labels, choices) if choices else ""
    return {"tokens": tokens, "partition": table, "sizes": part.sizes}


def _tls_args(run_dir: Path, server: bool) -> list[str]:
    s = run_dir / "secrets"
    if not (s / "ca.pem").exists():
        return []
    if server:
        return [
            "--tls-cert",
            str(s / "server.pem"),
            "--tls-key",
            str(s / "server.key"),
            "--tls-client-ca",
            str(s / "ca.pem"),
        ]
    return ["--tls-ca", str(s / "ca.pem"), "--tls-cert", str(s / "client.pem"), "--tls-key", str(s / "client.key")]


def run_processes(plan: RunPlan, run_dir: Path, resume: bool, progress: bool = True) -> dict[str, str]:
    """Start the server and the clients, follow the rounds, stop the server when the clients are done.

    Returns:
        The clients lost on the way (name: how they ended) in a run that still finished every round.

    Raises:
        RunStoppedError: the server did not start or died, or clients were lost and the run
            stopped before its last round.
    """
    port = free_loopback_port()
    tokens = json.loads((run_dir / "secrets" / "client_tokens.json").read_text())
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    server_cmd = [
        *FEDSEA,
        "serve",
        "--model",
        plan.model,
        "--port",
        str(port),
        "--run",
        str(run_dir / "config.toml"),
        "--run-dir",
        str(run_dir),
        "--tokens",
        str(run_dir / "secrets" / "tokens.json"),
        *_tls_args(run_dir, True),
        *(["--resume"] if resume else []),
    ]
    server_log = (logs / "server.log").open("a")
    server = subprocess.Popen(server_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert server.stdout is not None
    said = ""
    for line in server.stdout:
        server_log.write(line)
        said = line.strip() or said
        if "listening on" in line:
            break
    else:
        server_log.close()
        server.wait()
        raise RunStoppedError(f"the server did not start ({said or exit_reason(server.returncode)}); see {logs}")
    # Copy the server's output from here on as it comes: a full pipe would block the server.
    drain = threading.Thread(target=server_log.writelines, args=(server.stdout,), daemon=True)
    drain.start()
    clients = []
    for c in plan.clients:
        cmd = [
            *FEDSEA,
            "join",
            "--server",
            f"localhost:{port}",
            "--model",
            plan.model,
            "--run",
            str(run_dir / "config.toml"),
            "--client",
            c.name,
            "--shard",
            str(run_dir / "clients" / c.name / "shard.json"),
            "--token",
            tokens[c.name],
            "--log",
            str(run_dir / "clients" / c.name / "steps.jsonl"),
            "--noise-secret-file",
            str(run_dir / "clients" / c.name / "noise.secret"),
            "--net-latency-ms",  # the run file's WAN emulation (join takes it from flags only)
            str(plan.config.wire.latency_ms),
            *(["--net-mbps", str(plan.config.wire.mbps)] if plan.config.wire.mbps else []),
            "--quiet",
            *_tls_args(run_dir, False),
        ]
        # Clients compute only their head and tail: one thread each leaves the cores to the trunk.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        log = (logs / f"{c.name}.log").open("a")
        clients.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    pids = {"server": server.pid, **{c.name: p.pid for c, p in zip(plan.clients, clients, strict=True)}}
    atomic_write_text(run_dir / "pids.json", json.dumps(pids))
    rounds_file = run_dir / "server_rounds.jsonl"
    bar = tqdm(total=plan.fed.rounds, desc="rounds", unit="round", disable=not progress)
    seen = 0
    server_code: int | None = None
    try:
        while any(p.poll() is None for p in clients):
            server_code = server.poll()
            if server_code is not None:  # the server exits only when told: it died
                break
            records = rounds_file.read_text().splitlines() if rounds_file.exists() else []
            for line in records[seen:]:
                r = json.loads(line)
                losses = [v for v in r["losses"].values() if v is not None]
                bar.set_postfix(loss=f"{sum(losses) / max(1, len(losses)):.4f}", clients=len(r["submitted"]))
                bar.update(r["round"] - bar.n)
            seen = len(records)
            time.sleep(0.5)
        server_code = server.poll() if server_code is None else server_code
    finally:
        bar.close()
        for p in clients:
            if p.poll() is None:
                p.kill()
                p.wait()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        drain.join(timeout=10)
        server_log.close()
        (run_dir / "pids.json").unlink(missing_ok=True)
    completed = completed_round(run_dir)
    total = plan.fed.rounds
    if server_code is not None and completed < total:
        raise RunStoppedError(f"the server was lost ({exit_reason(server_code)}) after round {completed} of {total}")
    lost = {c.name: exit_reason(p.returncode) for c, p in zip(plan.clients, clients, strict=True) if p.returncode}
    if lost and completed < total:
        who = ", ".join(f"{name} ({how})" for name, how in lost.items())
        raise RunStoppedError(f"client(s) {who} failed and the run stopped after round {completed} of {total}")
    return lost


def global_model(plan: RunPlan, state: dict[str, torch.Tensor] | None, placement: Placement | None = None) -> Any:
    """The base model with the run's LoRA everywhere, holding ``state`` (None: the base model), on
    ``placement``'s device and in its dtype (default: ``[model]``'s)."""
    from fedsea.model.adapters import load_adapter_state_dict
    from fedsea.model.load import load_model
    from fedsea.model.split import split_model

    # Per-part LoRA: each block takes its part's spec at the run's one (p, q); one spec: any cut.
    p, q = plan.lora_cut or (1, 1)
    placement = placement or plan.config.model.placement()
    split = split_model(load_model(plan.model, placement.dtype, placement.device), p, q)
    if state is None:
        return split
    split.add_lora(plan.lora)
    for part in split.parts().values():
        load_adapter_state_dict(part, state, strict=False)
    return split


def evaluate_state(plan: RunPlan, state: dict[str, torch.Tensor] | None, tokenizer: Any) -> dict[str, float]:
    """The run's task metrics of the global model holding ``state`` (None: the base model)."""
    from fedsea import tasks

    split = global_model(plan, state)
    result = tasks.evaluate(
        plan.config.task.name, split.model, tokenizer, limit=plan.config.task.eval_limit, progress=False
    )
    return dict(result.metrics)


def centralized_baseline(plan: RunPlan, tokenizer: Any) -> dict[str, Any]:
    """The unsplit model on the union of the clients' data, with the same budget (samples seen)."""
    from fedsea.training.data import iterate_batches
    from fedsea.training.step import CentralTrainer

    t = plan.config.task
    from fedsea.model.seeding import seeded

    # The same LoRA initialisation as the federated run's global adapter (peft draws it in
    # block order under the run's seed, each part with its spec, see
    # fedsea.federation.coordinator.initial_global_state).
    with seeded(plan.fed.seed):
        split = global_model(plan, None).add_lora(plan.lora)
    torch.manual_seed(plan.fed.seed)  # LoRA dropout, if any
    examples = encode_task_examples(
        tokenizer, task_examples(t.name, t.train_split, t.train_limit), max(c.max_length for c in plan.clients)
    )
    batch = plan.clients[0].batch_size
    steps = plan.fed.rounds * plan.fed.local_steps * len(plan.clients)
    trainer = CentralTrainer(split, optim=plan.optim)
    losses = []
    epochs = steps * batch // max(1, len(examples)) + 1
    for _, b in zip(
        range(steps), iterate_batches(examples, batch, tokenizer.pad_token_id, epochs, plan.fed.seed), strict=False
    ):
        losses.append(trainer.train_step(b).loss)
    from fedsea import tasks

    result = tasks.evaluate(t.name, split.model, tokenizer, limit=t.eval_limit, progress=False)
    return {"steps": steps, "losses": losses, "metrics": dict(result.metrics)}


def simulate(
    config: str | None,
    overrides: list[str] | tuple[str, ...] = (),
    run_dir: str | None = None,
    centralized: bool = False,
    resume: str | None = None,
    progress: bool = True,
    eval_every_round: bool = True,
) -> dict[str, Any]:
    """Run a federated simulation end to end; returns a summary (also in ``run_dir/report.md``).

    ``eval_every_round=False`` evaluates the base model and the last round only (benchmarks).
    """
    from fedsea.federation.report import write_report
    from fedsea.model.load import load_tokenizer

    started = time.time()
    if resume:
        folder = Path(resume)
        if not (folder / "config.toml").is_file():
            raise FileNotFoundError(f"--resume {folder}: not a run folder (no config.toml)")
        plan = load_plan(folder / "config.toml", overrides)
    else:
        if config is None:
            raise ValueError("give a run file, or --resume RUN_DIR")
        plan = load_plan(config, overrides)
        folder = Path(run_dir or f"runs/{plan.config.task.name}-{plan.fed.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (folder / "checkpoints").exists():
            raise ValueError(f"{folder} already holds a run; use --resume {folder} or another --run-dir")
    check_plan(plan)  # before any folder or process: a bad run file is a one-line error
    created = not folder.exists()
    try:
        if resume:
            # The checkpoint is read in full here: a broken one is refused before the server starts.
            drop_unfinished_steps(plan, folder, completed_round(folder))
            info: dict[str, Any] = {"partition": "(resumed)"}
        else:
            info = prepare_run(plan, folder)
            if progress and info.get("partition"):
                print(info["partition"])
        lost = run_processes(plan, folder, resume=bool(resume), progress=progress)
    except RunStoppedError as exc:
        raise RunStoppedError(f"{exc}; {after_failure(folder, created, exc)}") from exc
    except CheckpointError:
        raise  # the folder is the user's run: leave it as it is
    except BaseException as exc:
        after_failure(folder, created, exc)
        raise
    clear_failed(folder)
    tokenizer = load_tokenizer(plan.model)
    metrics: list[dict[str, Any]] = [{"type": "eval", "round": 0, **evaluate_state(plan, None, tokenizer)}]
    for r in range(1, plan.fed.rounds + 1):
        path = folder / "checkpoints" / f"round-{r:04d}"
        if not eval_every_round and r != plan.fed.rounds:
            continue
        if (path / "state.json").exists():
            _, state, _, _ = load_round(path)
            metrics.append({"type": "eval", "round": r, **evaluate_state(plan, state, tokenizer)})
    central = centralized_baseline(plan, tokenizer) if centralized else None
    summary = write_report(plan, folder, metrics, central, info, time.time() - started, lost)
    return summary


def export_run(run_dir: str, out: str, placement: Placement | None = None) -> Path:
    """Merge a run's latest global adapter into a plain Hugging Face checkpoint (merged on
    ``placement``'s device, written in its dtype; default: the CPU in float32)."""
    from fedsea.model.load import load_tokenizer

    folder = Path(run_dir)
    plan = load_plan(folder / "config.toml")
    checkpoint = latest_round(folder)
    if checkpoint is None:
        raise ValueError(f"{folder} has no checkpoint yet")
    round_number, state, _, _ = load_round(checkpoint)
    placement = placement or Placement(device="cpu", dtype="float32")
    exported: Path = global_model(plan, state, placement).export(
        out, load_tokenizer(plan.model), run_record(plan, round_number)
    )
    return exported


def run_record(plan: RunPlan, rounds: int) -> Any:
    """What the exported model's card says about the run (``fedsea.model.model_card``)."""
    from fedsea.federation.report import noise_level
    from fedsea.model.model_card import TrainingRecord

    cuts = sorted({(c.head_layers, c.tail_layers) for c in plan.clients})
    cut = ", ".join(f"({p}, {q})" for p, q in cuts) + (" (mixed across clients)" if len(cuts) > 1 else "")
    task = plan.config.task
    return TrainingRecord(
        base_model=plan.model,
        cut=cut,
        lora=plan.lora.summary(),
        rounds=rounds,
        clients=len(plan.clients),
        mode=plan.config.federation.mode,
        noise=noise_level(plan),
        epsilon=plan.noise.epsilon if plan.noise.mode == "dp" else None,
        data=f"task {task.name} ({task.train_split} split), partitioned {task.partition} across the clients",
    )


__all__ = ["export_run", "load_config", "simulate"]
