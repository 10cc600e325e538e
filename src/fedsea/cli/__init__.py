"""The ``fedsea`` command: parses flags, builds configs and calls the library.

Nothing below this package imports it: it is the bottom layer (see ``tests/unit/test_layers.py``).

Building the parser imports no torch, transformers, gRPC, Flower or Ray: ``fedsea --help`` and
``fedsea <command> --help`` take a fraction of a second. Defaults and choices come from the settings
dataclasses and the torch-free ``constants`` modules (``fedsea.model.constants``, ...); each command
imports what it runs inside its function (``tests/unit/test_cli_startup.py`` checks it).
"""

from fedsea.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
