"""The split client: training steps and generation through a remote trunk.

The names below load on first use: importing a light submodule (``deadlines``, for the
command line's flags) loads no torch or gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsea.lazy import lazy_exports

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from fedsea.client.connection import ClientTls
    from fedsea.client.split_client import SplitClient
    from fedsea.client.staging import TrunkOperator, load_staged_trunk, publish_trunk
    from fedsea.training.generation import GenerationConfig, GenerationOutput, generate
    from fedsea.training.stepper import LocalStepper

# Public name -> the module that defines it, imported on first access.
_LAZY: dict[str, str] = {
    "ClientTls": "fedsea.client.connection",
    "SplitClient": "fedsea.client.split_client",
    "TrunkOperator": "fedsea.client.staging",
    "load_staged_trunk": "fedsea.client.staging",
    "publish_trunk": "fedsea.client.staging",
    "GenerationConfig": "fedsea.training.generation_config",
    "GenerationOutput": "fedsea.training.generation",
    "generate": "fedsea.training.generation",
    "LocalStepper": "fedsea.training.stepper",
}

__all__ = [
    "ClientTls",
    "GenerationConfig",
    "GenerationOutput",
    "LocalStepper",
    "SplitClient",
    "TrunkOperator",
    "generate",
    "load_staged_trunk",
    "publish_trunk",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
