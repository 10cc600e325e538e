"""``fedsea config``: the run file's schema, as a complete commented example that loads as it is."""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_example(args: argparse.Namespace) -> int:
    from fedsea.federation.simconfig import example_run_file

    print(example_run_file(args.mode), end="")
    return 0


def add_config_commands(sub: Any) -> None:
    """Register ``fedsea config example`` on the ``fedsea`` parser."""
    from fedsea.federation.config import MODES, FedConfig

    config = sub.add_parser("config", help="run files: print a complete, commented example (the schema)")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    example = config_sub.add_parser("example", help="print every setting of a run file at its default, documented")
    example.add_argument(
        "--mode", choices=MODES, default=FedConfig().mode, help="the federation mode (default: %(default)s)"
    )
    example.set_defaults(func=_cmd_example)
