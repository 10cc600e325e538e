"""``fedsea flower new`` and ``fedsea flower simulate``: federations on Flower (``fedsea.flower``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _cmd_new(args: argparse.Namespace) -> int:
    from fedsea.flower.template import write_app

    folder = Path(args.dir)
    if (folder / "pyproject.toml").exists():
        raise ValueError(f"{folder / 'pyproject.toml'} exists: choose an empty folder")
    write_app(folder)
    print(f"wrote {folder}/pyproject.toml (the Flower app) and {folder}/run.toml (the federation)")
    print(f"run it on this machine: flwr run {folder}   or   fedsea flower simulate {folder}/run.toml")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedsea.flower.simulation import simulate_on_flower

    config, overrides = args.config, list(args.set)
    if args.resume and config is not None:
        if "=" not in config:
            raise ValueError(f"--resume continues {args.resume} with its own run file: drop {config!r}")
        config, overrides = None, [config, *overrides]
    summary = simulate_on_flower(
        config, overrides, run_dir=args.run_dir, strategy=args.strategy or "", resume=args.resume,
        centralized=args.centralized, secure_aggregation=args.secure_aggregation,
    )  # fmt: skip
    print(json.dumps(summary) if args.json else f"report: {summary['report']}")
    return 0


def add_flower_commands(sub: Any) -> None:
    """Register ``fedsea flower new|simulate``."""
    from fedsea.flower.settings import FLOWER_STRATEGIES

    flower = sub.add_parser("flower", help="federated runs on Flower (control plane) with fedsea's trunk (data plane)")
    kinds = flower.add_subparsers(dest="flower_command", required=True)
    new = kinds.add_parser("new", help="write a Flower app folder (pyproject.toml + run.toml) to copy and edit")
    new.add_argument("dir")
    new.set_defaults(func=_cmd_new)
    sim = kinds.add_parser(
        "simulate", help="the run file's clients as virtual SuperNodes on Flower's Simulation Engine"
    )
    sim.add_argument("config", nargs="?", help="run file (TOML); omit with --resume")
    sim.add_argument("set", nargs="*", help="overrides: section.key=value")
    sim.add_argument("--run-dir", help="run folder (default: runs/flower-<task>-<mode>-<time>)")
    sim.add_argument("--strategy", choices=FLOWER_STRATEGIES, help="Flower strategy (default: the run file's)")
    sim.add_argument("--resume", help="continue the stopped run in this folder from its last round")
    sim.add_argument("--centralized", action="store_true", help="also train the unsplit model, same budget")
    sim.add_argument(
        "--secure-aggregation", action="store_true",
        help="SecAgg+: the ServerApp learns only the sum of the clients' head/tail adapters (one cut for all)",
    )  # fmt: skip
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(func=_cmd_simulate)
