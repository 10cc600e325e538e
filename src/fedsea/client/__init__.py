"""The split client: training steps and generation through a remote trunk."""

from fedsea.client.connection import ClientTls
from fedsea.client.split_client import SplitClient
from fedsea.client.staging import TrunkOperator, load_staged_trunk, publish_trunk
from fedsea.training.generation import GenerationConfig, GenerationOutput, generate
from fedsea.training.stepper import LocalStepper

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
