"""``fedsea simulate``: a federation of N clients and a trunk server on this machine.

One orchestration: the rounds run on Flower's Simulation Engine (``fedsea.flower``: the
ServerApp starts the trunk server in this process, the clients are virtual SuperNodes), the
same code as ``fedsea flower simulate`` and ``flwr run``. The native engine
(``fedsea.federation.native``: a ``fedsea serve --run`` process and N ``fedsea join`` processes)
runs only what Flower cannot do yet, ``federation.mode = "client-batch"`` (said on stderr), or
when asked (``engine="native"``, ``fedsea simulate --engine native``). Either way the data plane
is real loopback gRPC with TLS and per-client tokens, this process prepares the run folder
(resolved config, certificates, tokens, data shards) and afterwards evaluates each round's global
adapter and writes the same report, ``metrics.jsonl`` and plots.

Faults: a client lost while the others finish every round is reported (a warning, and
``lost_clients`` in the summary and report), not an error; a server lost, or clients lost before
the last round, stop the run with a one-line ``RunStoppedError`` that says how to ``--resume``.
The run folder then keeps its checkpoints, or is removed when this invocation made it and no
round was checkpointed (``fedsea.federation.runstate``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

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
)
from fedsea.federation.simconfig import RunPlan, dump_tree, load_config, load_plan
from fedsea.io import atomic_write_text

ENGINES = ("auto", "flower", "native")
NATIVE_ONLY_MODES = ("client-batch",)  # what Flower's rounds (fedsea.flower.rounds) cannot run yet
ENGINE_FILE = "engine"  # in the run folder: the engine that runs it (a resume goes on with the same)


def run_engine(run_dir: Path) -> str | None:
    """The engine the run in ``run_dir`` ran on: its ``engine`` file, else its rounds' records (a
    record without ``engine`` is the native coordinator's); None for a run without either."""
    path = run_dir / ENGINE_FILE
    if path.is_file():
        return path.read_text().strip() or None
    from fedsea.federation.report import read_jsonl

    records = read_jsonl(run_dir / "server_rounds.jsonl") if (run_dir / "server_rounds.jsonl").exists() else []
    return str(records[-1].get("engine", "native")) if records else None


def pick_engine(plan: RunPlan, engine: str = "auto") -> str:
    """The engine that runs ``plan``: ``"flower"``, or ``"native"`` where Flower cannot run it yet.

    ``auto`` picks Flower and falls back to the native engine for a mode only it runs, saying so
    on stderr (never silently); ``flower`` refuses such a mode; ``native`` is always the native.
    Flower-only settings (a Flower strategy, secure aggregation) are checked by the caller.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    native_only = plan.fed.mode in NATIVE_ONLY_MODES
    if engine == "flower" and native_only:
        raise ValueError(
            f"federation.mode = {plan.fed.mode!r} does not run on Flower yet (its clients' steps are joined "
            "into one trunk batch on the server): use --engine native, or mode hierarchical or sequential"
        )
    if engine == "auto" and native_only:
        print(
            f"fedsea: note: federation.mode = {plan.fed.mode!r} runs on the native engine (fedsea serve --run and "
            "fedsea join processes): Flower cannot batch the clients' steps on the trunk server yet",
            file=sys.stderr,
        )
        return "native"
    return "native" if engine == "native" else "flower"


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
    engine: str = "auto",
    strategy: str = "",
    secure_aggregation: bool = False,
) -> dict[str, Any]:
    """Run a federated simulation end to end; returns a summary (also in ``run_dir/report.md``).

    Args:
        config: the run file (TOML); None with ``resume`` (the run folder's ``config.toml``).
        overrides: ``section.key=value`` settings over the run file.
        run_dir: the run folder (default ``runs/<task>-<mode>-<time>``).
        centralized: also train the unsplit model on the union of the data, same budget.
        resume: continue the run in this folder from its last checkpoint (with ``engine="auto"``
            on the engine it ran on: ``run_engine``).
        progress: print the partition (and the native engine's round bar).
        eval_every_round: False evaluates the base model and the last round only (benchmarks).
        engine: ``auto`` (Flower; native for a mode Flower cannot run yet, said on stderr),
            ``flower`` or ``native`` (``pick_engine``).
        strategy: the Flower strategy (``fedavg``, ``fedadam``, ``median``, ``trimmed-mean``);
            empty: the run file's ``federation.strategy``. Flower only.
        secure_aggregation: SecAgg+ over the head/tail adapters (``fedsea.flower.secagg``). Flower only.

    The summary has ``engine``: the engine that ran the rounds.
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
    if resume and engine == "auto":
        engine = run_engine(folder) or engine  # a run goes on with the engine it started on
    chosen = pick_engine(plan, engine)
    if chosen == "native" and (strategy or secure_aggregation):
        raise ValueError("--strategy and --secure-aggregation are Flower's: drop them, or drop --engine native")
    if secure_aggregation:  # a clear error now rather than a failed ServerApp
        from fedsea.flower.secagg import check_plan as check_secure

        check_secure(plan, strategy or plan.fed.strategy.lower())
    folder = folder.resolve()  # the Flower apps read it from a run config: one meaning for every party
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
        atomic_write_text(folder / ENGINE_FILE, chosen + "\n")
        if chosen == "native":
            from fedsea.federation.native import run_processes

            lost = run_processes(plan, folder, resume=bool(resume), progress=progress)
        else:
            from fedsea.flower.simulation import run_on_flower

            # The resolved config.toml holds the run file and its overrides; a resume's overrides go on top.
            lost = run_on_flower(plan, folder, list(overrides) if resume else [], bool(resume), strategy,
                                 secure_aggregation)  # fmt: skip
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
    summary["engine"] = chosen
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
    _, state, _, _ = load_round(checkpoint)
    placement = placement or Placement(device="cpu", dtype="float32")
    exported: Path = global_model(plan, state, placement).export(out, load_tokenizer(plan.model))
    return exported


__all__ = ["ENGINES", "export_run", "load_config", "pick_engine", "simulate"]
