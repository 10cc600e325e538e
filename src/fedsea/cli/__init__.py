"""The ``fedsea`` command: parses flags, builds configs and calls the library.

Nothing below this package imports it: it is the bottom layer (see ``tests/unit/test_layers.py``).
"""

from fedsea.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
