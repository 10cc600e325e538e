"""``fedsea flower new`` and ``fedsea flower simulate``: federations on Flower (``fedsea.flower``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _cmd_new(args: argparse.Namespace) -> int:
    from fedsea.flower.template import write_app

    folder = Path(args.dir)
    if (folder / "pyproject.toml").exists():
        raise ValueError(f"{folder / 'pyproject.toml'} exists: choose an empty folder")
    write_app(folder)
    print(f"wrote {folder}/pyproject.toml (the Flower app) and {folder}/run.toml (the federation)")
    print(f"run it on this machine: flwr run {folder}   or   fedsea simulate {folder}/run.toml")
    return 0


def add_flower_commands(sub: Any) -> None:
    """Register ``fedsea flower new|simulate``."""
    from fedsea.cli.fed import _cmd_simulate, add_simulate_args

    flower = sub.add_parser("flower", help="federated runs on Flower (control plane) with fedsea's trunk (data plane)")
    kinds = flower.add_subparsers(dest="flower_command", required=True)
    new = kinds.add_parser("new", help="write a Flower app folder (pyproject.toml + run.toml) to copy and edit")
    new.add_argument("dir")
    new.set_defaults(func=_cmd_new)
    sim = kinds.add_parser(
        "simulate", help="fedsea simulate --engine flower: the run file's clients as virtual SuperNodes"
    )
    add_simulate_args(sim, engine=False)
    sim.set_defaults(func=_cmd_simulate, engine="flower")
