"""Where the generation loop used to live: it is ``fedsea.training.generation`` now (re-exported).

The loop is network-free and sits in the training layer; the client keeps ``RemoteStepper``
(``fedsea.client.remote_generation``), the trunk's side over the wire.
"""

from fedsea.training.generation import (
    GenerationConfig,
    GenerationOutput,
    GenerationStep,
    TextStream,
    generate,
    generate_steps,
    stream_text,
)
from fedsea.training.stepper import LocalStepper, TrunkStepper

__all__ = [
    "GenerationConfig",
    "GenerationOutput",
    "GenerationStep",
    "LocalStepper",
    "TextStream",
    "TrunkStepper",
    "generate",
    "generate_steps",
    "stream_text",
]
