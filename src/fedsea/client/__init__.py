"""The split client: training steps and generation through a remote trunk."""

from fedsea.client.connection import ClientTls
from fedsea.client.generation import GenerationConfig, GenerationOutput, LocalStepper, generate
from fedsea.client.split_client import SplitClient

__all__ = ["ClientTls", "GenerationConfig", "GenerationOutput", "LocalStepper", "SplitClient", "generate"]
