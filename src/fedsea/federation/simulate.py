"""``fedsea simulate``'s pipeline: a federation of N clients and a trunk server on this machine.

This process loads and checks the run, prepares the run folder (resolved config, certificates,
tokens, data shards), has an engine play the rounds, and afterwards evaluates each round's
global adapter and writes the report, ``metrics.jsonl`` and plots: one pipeline whichever engine
plays the rounds (``run_and_report``). The engines: Flower's Simulation Engine
(``fedsea.flower.simulation.simulate``, what ``fedsea simulate`` runs; the layer above this one),
and the native coordinator (``fedsea.federation.native``: a ``fedsea serve --run`` process and
N ``fedsea join`` processes), which ``simulate`` here runs, kept for what Flower cannot run yet
(``client-batch``). Either way the data plane is real loopback gRPC with TLS and tokens.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedsea.config import Placement
from fedsea.federation.checkpoint import CheckpointError, load_round
from fedsea.federation.data import (
    check_client_data,
    encode_task_examples,
    heldout_losses,
    own_data_table,
    own_examples,
    task_examples,
    write_data_shard,
    write_shard,
)
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

# Plays a prepared run's rounds: (plan, run folder, a resume's overrides, resume?) -> clients lost.
RoundsRunner = Callable[[RunPlan, Path, list[str], bool], dict[str, str]]
ENGINE_FILE = "engine"  # in the run folder: the engine that runs it (a resume goes on with the same)


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
    for client in plan.clients:  # own files: the shard names the file (join, Flower, native read it alike)
        if client.data is not None:
            write_data_shard(run_dir / "clients" / client.name / "shard.json", client.data, t.holdout)
    on_task = [c for c in plan.clients if c.data is None]
    table = own_data_table(plan.clients, t.holdout) if len(on_task) < len(plan.clients) else ""
    if not on_task:
        return {"tokens": tokens, "partition": table}
    examples = task_examples(t.name, t.train_split, t.train_limit)
    labels = [e.label if e.label is not None else 0 for e in examples]
    part = tasks.partition(labels, num_clients=len(on_task), scheme=t.partition, alpha=t.alpha, seed=plan.fed.seed)
    for client, indices in zip(on_task, part.clients, strict=True):
        write_shard(
            run_dir / "clients" / client.name / "shard.json",
            t.name,
            t.train_split,
            [examples[i].id for i in indices],
            t.train_limit,
        )
    choices = list(examples[0].choices) if examples and examples[0].choices else None
    tables = [table, part.table(labels, choices) if choices else ""]
    return {"tokens": tokens, "partition": "\n\n".join(x for x in tables if x), "sizes": part.sizes}


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
    """The run's metrics of the global model holding ``state`` (None: the base model)."""
    return evaluate_model(plan, global_model(plan, state).model, tokenizer)


def evaluate_model(plan: RunPlan, model: Any, tokenizer: Any) -> dict[str, float]:
    """The held-out loss on the clients' own files (``heldout_loss``, if any client has one) and
    the task's metrics (if any client trains on the task's partition)."""
    from fedsea import tasks

    t = plan.config.task
    metrics = heldout_losses(plan.clients, t.holdout, model, tokenizer)
    if any(c.data is None for c in plan.clients):
        metrics.update(tasks.evaluate(t.name, model, tokenizer, limit=t.eval_limit, progress=False).metrics)
    return metrics


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
    examples = [e for c in plan.clients if c.data is not None for e in own_examples(tokenizer, c, t.holdout)[0]]
    if any(c.data is None for c in plan.clients):
        examples += encode_task_examples(
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
    return {"steps": steps, "losses": losses, "metrics": evaluate_model(plan, split.model, tokenizer)}


def open_run(
    config: str | None, overrides: list[str] | tuple[str, ...], run_dir: str | None, resume: str | None
) -> tuple[RunPlan, Path]:
    """The run's plan and its folder (absolute), checked before any folder or process is made.

    Raises:
        FileNotFoundError: ``resume`` is not a run folder.
        ValueError: no run file, or ``run_dir`` already holds a run.
        PartitionError, InvalidInputError, ModelNotFoundError, ...: ``runstate.check_plan``.
    """
    if resume:
        folder = Path(resume)
        if not (folder / "config.toml").is_file():
            raise FileNotFoundError(f"--resume {folder}: not a run folder (no config.toml)")
        plan = load_plan(folder / "config.toml", overrides)
        if overrides:
            resume_overrides(folder, plan)
    else:
        if config is None:
            raise ValueError("give a run file, or --resume RUN_DIR")
        plan = load_plan(config, overrides)
        # named after the task, or "data" when every client trains on its own file
        what = plan.config.task.name if any(c.data is None for c in plan.clients) else "data"
        folder = Path(run_dir or f"runs/{what}-{plan.fed.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (folder / "checkpoints").exists():
            raise ValueError(f"{folder} already holds a run; use --resume {folder} or another --run-dir")
    check_plan(plan)  # before any folder or process: a bad run file is a one-line error
    check_client_data(plan.clients)  # and so is a missing or malformed own data file
    # Absolute: Flower's apps read it from a run config, one meaning for every party.
    return plan, folder.resolve()


# What a resume may change: how long the run goes on and how long it waits. Everything else
# (model, data, partition, LoRA, noise, mode, ...) made the checkpoints and must stay as it was.
RESUMABLE_KEYS = ("federation.rounds",)
RESUMABLE_SUFFIX = "_timeout_s"


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_overrides(folder: Path, plan: RunPlan) -> None:
    """Apply a resume's overrides to the run folder's ``config.toml`` and say so on stderr, or
    refuse them (``ValueError``) when they would change what the checkpoints were made with."""
    before = _flat(load_plan(folder / "config.toml").tree)
    after = _flat(plan.tree)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    fixed = [k for k in changed if k not in RESUMABLE_KEYS and not k.endswith(RESUMABLE_SUFFIX)]
    if fixed:
        shown = ", ".join(f"{k} ({before.get(k)!r} -> {after.get(k)!r})" for k in fixed)
        raise ValueError(
            f"--resume {folder}: {shown} would change the run its checkpoints were made by; a resume may change "
            f"only {', '.join(RESUMABLE_KEYS)} and the *{RESUMABLE_SUFFIX} settings (start a new run for the rest)"
        )
    if changed:
        atomic_write_text(folder / "config.toml", dump_tree(plan.tree))
        applied = ", ".join(f"{k} = {after.get(k)!r} (was {before.get(k)!r})" for k in changed)
        print(f"fedsea: note: --resume applies {applied} to {folder / 'config.toml'}", file=sys.stderr)


def run_and_report(
    plan: RunPlan,
    folder: Path,
    play: RoundsRunner,
    engine: str,
    overrides: list[str] | tuple[str, ...] = (),
    resume: bool = False,
    centralized: bool = False,
    progress: bool = True,
    eval_every_round: bool = True,
) -> dict[str, Any]:
    """Prepare (or, with ``resume``, check) ``folder``, have ``play`` play the rounds, evaluate, report.

    Args:
        plan, folder: from ``open_run``.
        play: the engine's ``RoundsRunner``; it gets ``overrides`` on a resume (the resolved
            ``config.toml`` already holds a new run's).
        engine: its name, written to the run folder's ``engine`` file and the summary's ``engine``.

    Returns:
        The summary (``fedsea.federation.report.write_report``) with ``engine``.
    """
    started = time.time()
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
        atomic_write_text(folder / ENGINE_FILE, engine + "\n")
        lost = play(plan, folder, list(overrides) if resume else [], resume)
    except RunStoppedError as exc:
        raise RunStoppedError(f"{exc}; {after_failure(folder, created, exc)}") from exc
    except CheckpointError:
        raise  # the folder is the user's run: leave it as it is
    except BaseException as exc:
        after_failure(folder, created, exc)
        raise
    clear_failed(folder)
    summary = report_run(plan, folder, info, started, lost, centralized, eval_every_round)
    summary["engine"] = engine
    return summary


def report_run(
    plan: RunPlan,
    folder: Path,
    info: dict[str, Any],
    started: float,
    lost: dict[str, str] | None = None,
    centralized: bool = False,
    eval_every_round: bool = True,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Evaluate a finished run's global adapters and write its ``metrics.jsonl``, report and plots.

    The second half of ``run_and_report``, also what the Flower ServerApp runs at the end of a
    Deployment Engine run (``fedsea.flower.server_app``): one report writer for every engine.

    Args:
        info: ``prepare_run``'s (its ``partition`` table goes into the report).
        started: the run's start (``time.time()``), for the report's duration.
        eval_every_round: False evaluates the base model and the last round only.
        evaluate: False evaluates nothing (no ``eval`` records, no ``eval.png``).

    Returns:
        The summary (``fedsea.federation.report.write_report``).
    """
    from fedsea.federation.report import write_report
    from fedsea.model.load import load_tokenizer

    metrics: list[dict[str, Any]] = []
    tokenizer = load_tokenizer(plan.model) if evaluate or centralized else None
    if evaluate:
        metrics.append({"type": "eval", "round": 0, **evaluate_state(plan, None, tokenizer)})
        for r in range(1, plan.fed.rounds + 1):
            path = folder / "checkpoints" / f"round-{r:04d}"
            if not eval_every_round and r != plan.fed.rounds:
                continue
            if (path / "state.json").exists():
                _, state, _, _ = load_round(path)
                metrics.append({"type": "eval", "round": r, **evaluate_state(plan, state, tokenizer)})
    central = centralized_baseline(plan, tokenizer) if centralized else None
    return write_report(plan, folder, metrics, central, info, time.time() - started, lost)


def simulate(
    config: str | None,
    overrides: list[str] | tuple[str, ...] = (),
    run_dir: str | None = None,
    centralized: bool = False,
    resume: str | None = None,
    progress: bool = True,
    eval_every_round: bool = True,
) -> dict[str, Any]:
    """A federated simulation end to end on the native coordinator; returns a summary (also in
    ``run_dir/report.md``). ``fedsea simulate`` runs ``fedsea.flower.simulation.simulate`` (Flower,
    native only where Flower cannot run the mode yet); this is its ``--engine native``.

    ``eval_every_round=False`` evaluates the base model and the last round only (benchmarks).
    """
    from fedsea.federation.native import run_processes

    plan, folder = open_run(config, overrides, run_dir, resume)

    def play(plan: RunPlan, folder: Path, _: list[str], resume: bool) -> dict[str, str]:
        return run_processes(plan, folder, resume=resume, progress=progress)

    return run_and_report(plan, folder, play, "native", overrides, bool(resume), centralized, progress,
                          eval_every_round)  # fmt: skip


def export_run(run_dir: str, out: str, placement: Placement | None = None) -> Path:
    """Merge a run's global adapter into a plain Hugging Face checkpoint (merged on ``placement``'s
    device, written in its dtype; default: the CPU in float32), with a model card.

    ``run_dir``: a run folder (its latest round) or one of its round checkpoints
    (``RUN/checkpoints/round-NNNN``).
    """
    from fedsea.federation.run_adapters import run_source
    from fedsea.model.load import load_tokenizer

    source = run_source(run_dir)
    if source is None:
        if not (Path(run_dir) / "config.toml").is_file():
            raise FileNotFoundError(f"cannot read run file {Path(run_dir) / 'config.toml'}: {run_dir} is no run folder")
        raise ValueError(f"{run_dir} has no checkpoint yet")
    folder, checkpoint = source
    plan = load_plan(folder / "config.toml")
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
    return TrainingRecord(
        base_model=plan.model,
        cut=cut,
        lora=plan.lora.summary(),
        rounds=rounds,
        clients=len(plan.clients),
        mode=plan.config.federation.mode,
        noise=noise_level(plan),
        epsilon=plan.noise.epsilon if plan.noise.mode == "dp" else None,
        data=run_data(plan),
    )


def run_data(plan: RunPlan) -> str:
    """What the clients trained on, in words (the model card's data description)."""
    task, own = plan.config.task, [c for c in plan.clients if c.data is not None]
    words = [f"{c.name}: its own file {Path(str(c.data)).name}" for c in own]
    if len(own) < len(plan.clients):
        words.append(
            f"task {task.name} ({task.train_split} split), partitioned {task.partition} across the "
            + ("others" if own else "clients")
        )
    return "; ".join(words)


__all__ = ["export_run", "load_config", "open_run", "report_run", "run_and_report", "run_record", "simulate"]
