"""``fedsea join``, ``fedsea simulate`` (``fedsea flower simulate`` too) and ``fedsea export``: federated runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsea.cli.flags import add_settings_flags, settings_from_flags
from fedsea.cli.generate import (
    WIRE_FLAGS,
    add_connection_args,
    client_timeouts,
    client_tls,
    model_settings,
)
from fedsea.config import DTYPE_SPECS, Placement, WireConfig

if TYPE_CHECKING:
    from fedsea.federation.simconfig import ClientPlan, ModelSettings, RunPlan


FLOWER_POINTER = (
    "runs across machines go on Flower: `fedsea serve` (the trunk server, no --run), flower-superlink, "
    "one flower-supernode per data owner and `flwr run` (README: Across machines on Flower)"
)
NATIVE_ENGINE_ENV = "FEDSEA_NATIVE_ENGINE"  # set by fedsea simulate --engine native on its processes: no note


def native_note(command: str, mode: str) -> None:
    """Say on stderr that ``command`` is the native coordinator, deprecated: runs go on Flower.

    Not for the processes of ``fedsea simulate --engine native`` (``FEDSEA_NATIVE_ENGINE=1``),
    which asked for it.
    """
    if os.environ.get(NATIVE_ENGINE_ENV) == "1":
        return
    why = f"deprecated for mode {mode}: {FLOWER_POINTER}"
    print(f"fedsea: note: `{command}` is fedsea's native coordinator, {why}", file=sys.stderr, flush=True)


def join_settings(args: argparse.Namespace) -> tuple[RunPlan, ClientPlan, ModelSettings, WireConfig]:
    """The run, this client's settings, its model and its wire: the run file's, and the flags given
    (``--model``, ``--device``, ``--dtype``, ``--head-layers``, ``--tail-layers``, ``--wire-dtype``,
    ``--wire-compression``, ``--net-*``) over them."""
    from fedsea.federation.cuts import refuse_moving_cuts
    from fedsea.federation.simconfig import load_plan

    plan = load_plan(args.run)
    refuse_moving_cuts(plan.clients, "fedsea join (the native engine)")  # the fixed-cut reference
    names = {c.name: c for c in plan.clients}
    if args.client not in names:
        raise ValueError(f"no client {args.client!r} in {args.run}; it has {', '.join(names)}")
    me = settings_from_flags(args, names[args.client], ["head_layers", "tail_layers"])
    for key in ("batch_size", "max_length"):
        if getattr(me, key) < 1:
            raise ValueError(f"{args.client}.{key} in {args.run} must be >= 1, got {getattr(me, key)}")
    cut = plan.lora_cut
    if cut is not None and (me.head_layers, me.tail_layers) != cut:
        # The server would refuse the session: refuse before loading the model.
        raise ValueError(
            f"the run's parts have different LoRA ({plan.lora.summary()}), so every client cuts at "
            f"(head_layers, tail_layers) = {cut}; got {(me.head_layers, me.tail_layers)}"
        )
    # The client's device and dtype: its [[clients]] table's, else [client]'s, else [model]'s.
    model = model_settings(args, plan.config.model.placed(me.device, me.dtype))
    # The dtype and compression come from the run file unless --wire-dtype/--wire-compression; the
    # emulated latency and bandwidth
    # only from --net-latency-ms/--net-mbps: a run file's [wire] emulation is for `simulate`
    # (which passes it on as these flags), never an artificial delay on a real deployment.
    base = WireConfig(dtype=plan.config.wire.dtype, compression=plan.config.wire.compression)
    wire = settings_from_flags(args, base, list(WIRE_FLAGS), flags=WIRE_FLAGS)
    return plan, me, model, wire


def _cmd_join(args: argparse.Namespace) -> int:
    from fedsea.federation.client import load_noise_secret
    from fedsea.federation.data import load_client_data
    from fedsea.federation.participant import build_participant
    from fedsea.federation.report import noise_record
    from fedsea.model.load import load_tokenizer

    plan, me, model, wire = join_settings(args)
    native_note("fedsea join", plan.fed.mode)
    tokenizer = load_tokenizer(model.source)
    try:
        examples = load_client_data(tokenizer, args.shard, args.data, me.max_length, me, plan.config.task.holdout)
    except (KeyError, TypeError) as exc:  # a shard without its fields: name the file, not a traceback
        raise ValueError(f"--shard {args.shard} is not a task shard (task, split, ids): missing {exc}") from exc
    log = Path(args.log) if args.log else None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)

    def write(record: dict[str, Any]) -> None:
        if log is not None:
            with log.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def on_step(round_number: int, step: int, loss: float) -> None:
        write({"client": me.name, "round": round_number, "step": step, "loss": loss})

    def on_round(result: Any) -> None:
        record = {"client": me.name, "round": result.round, "samples": result.samples}
        record.update(bytes_sent=result.bytes_sent, bytes_received=result.bytes_received)
        meter = participant.client.connection.meter if participant.client.connection is not None else None
        if meter is not None:  # this process's totals so far: its bytes if it is killed later
            record.update(total_sent=meter.bytes_sent, total_received=meter.bytes_received)
        write(record)

    secret = load_noise_secret(args.noise_secret_file) if args.noise_secret_file else None
    participant = build_participant(
        plan, me, model, examples, tokenizer, args.server, wire=wire, tls=client_tls(args),
        token=args.token or os.environ.get("FEDSEA_TOKEN"),
        # A round wait lasts up to the run's join timeout (the first) or round timeout, plus aggregation.
        timeouts=client_timeouts(args, plan.fed.join_timeout_s + plan.fed.round_timeout_s + 600.0),
        noise_secret=secret, on_step=on_step, on_round=on_round, progress=not args.quiet,
    )  # fmt: skip
    print(f"{me.name}: noise on h_p (p={me.head_layers}): {participant.noise.summary()}", flush=True)
    write({"client": me.name, "noise": noise_record(participant.noise, me.head_layers)})
    try:
        history = participant.fed.run()
        stats = participant.client.stats()
    finally:
        participant.close()
    final = {"client": me.name, "final": True, "bytes_sent": stats["bytes_sent"]}
    final.update(bytes_received=stats["bytes_received"], rpcs=stats["rpcs"])
    write(final)
    trained = [h for h in history if h.selected]
    steps = sum(len(h.losses) for h in trained)
    mib_sent, mib_received = stats["bytes_sent"] / 2**20, stats["bytes_received"] / 2**20
    print(f"{me.name}: {len(trained)} rounds, {steps} steps, sent {mib_sent:.1f} MiB, received {mib_received:.1f} MiB")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedsea.flower.simulation import simulate

    config, overrides = args.config, list(args.set)
    # --device/--dtype: every party's ([model]); [server], [client] and [[clients]] may still differ.
    placed = {key: getattr(args, key, None) for key in ("device", "dtype")}  # fedsea flower simulate has neither
    overrides += [f"model.{key}={json.dumps(value)}" for key, value in placed.items() if value]
    if args.resume and config is not None:
        # With --resume the run file is the run folder's: a first positional is an override.
        if "=" not in config:
            raise ValueError(f"--resume continues {args.resume} with its own run file: drop {config!r}")
        config, overrides = None, [config, *overrides]
    if args.resume and args.run_dir:
        raise ValueError("--resume RUN_DIR names the run folder: drop --run-dir")
    summary = simulate(
        config, overrides, run_dir=args.run_dir, centralized=args.centralized, resume=args.resume,
        engine=getattr(args, "engine", "auto"), strategy=getattr(args, "strategy", None) or "",
        secure_aggregation=getattr(args, "secure_aggregation", False),
    )  # fmt: skip
    for name, how in summary.get("lost_clients", {}).items():
        # The run finished with the others: a warning, not a failure (the report says so too).
        print(f"fedsea: warning: {name} was lost ({how}); the run finished without it", file=sys.stderr)
    print(json.dumps(summary) if args.json else f"report: {summary['report']}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fedsea.federation.simulate import export_run

    out = export_run(args.run_dir, args.out, settings_from_flags(args, Placement(device="cpu", dtype="float32")))
    print(f"wrote a merged Hugging Face model to {out}")
    return 0


def add_simulate_args(sim: argparse.ArgumentParser, engine: bool = True) -> None:
    """The flags of ``fedsea simulate`` (and of ``fedsea flower simulate``, without ``--engine``)."""
    from fedsea.flower.settings import FLOWER_STRATEGIES
    from fedsea.flower.simulation import ENGINES

    sim.add_argument("config", nargs="?", help="run file (TOML); omit with --resume")
    sim.add_argument("set", nargs="*", help="overrides: section.key=value")
    sim.add_argument("--run-dir", help="run folder (default: runs/<task>-<mode>-<time>)")
    sim.add_argument(
        "--centralized", action="store_true", help="also train the unsplit model on the union, same budget"
    )
    sim.add_argument("--resume", help="continue the stopped run in this folder from its last round")
    if engine:
        sim.add_argument(
            "--engine", choices=ENGINES, default="auto",
            help="flower: Flower's Simulation Engine; native: fedsea serve --run and fedsea join processes; "
            "auto (default): flower",
        )  # fmt: skip
    sim.add_argument("--strategy", choices=FLOWER_STRATEGIES, help="Flower strategy (default: the run file's)")
    sim.add_argument(
        "--secure-aggregation", action="store_true",
        help="SecAgg+ on Flower: the server learns only the sum of the clients' head/tail adapters (one cut for all)",
    )  # fmt: skip
    sim.add_argument("--json", action="store_true")


def add_fed_commands(sub: Any) -> None:
    """Register ``join``, ``simulate`` and ``export`` on the ``fedsea`` subparsers."""
    join = sub.add_parser("join", help="take part in the server's federated run as one client")
    add_connection_args(join, keep="the run file's")
    join.add_argument("--run", required=True, help="the run file (TOML), the same as the server's")
    join.add_argument("--client", required=True, help="this client's name in the run file (client-0, ...)")
    join.add_argument("--shard", help="a task shard (JSON of example ids) written by fedsea simulate")
    join.add_argument("--data", help='or a JSONL file of {"text"} or {"prompt", "completion"} rows')
    join.add_argument("--log", help="append step losses and traffic (JSONL) here")
    join.add_argument(
        "--noise-secret-file",
        help="keep the secret the noise is seeded with here (made on first use; the same file again "
        "gives a resumed run the same noise). Default: a fresh secret per process",
    )
    join.add_argument("--quiet", action="store_true")
    join.set_defaults(func=_cmd_join)

    sim = sub.add_parser(
        "simulate", help="N clients and a trunk server on this machine: Flower's Simulation Engine, loopback gRPC, TLS"
    )
    add_simulate_args(sim)
    # Shorthands of the overrides model.device= and model.dtype=: the run file's [model] keeps its doc.
    add_settings_flags(sim, Placement(), choices={"dtype": DTYPE_SPECS}, keep="the run file's [model]")
    sim.set_defaults(func=_cmd_simulate)

    export = sub.add_parser("export", help="merge a run's global adapters into a Hugging Face model")
    export.add_argument("run_dir")
    export.add_argument("out")
    # Merging is a few matrix products per block: the CPU in float32 (the merged weights' dtype) by default.
    add_settings_flags(export, Placement(device="cpu", dtype="float32"), choices={"dtype": DTYPE_SPECS})
    export.set_defaults(func=_cmd_export)
