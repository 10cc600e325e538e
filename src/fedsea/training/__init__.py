"""Training steps shared by the split client and the centralized baseline, and the generation loop."""

from fedsea.training.batch import IGNORE_INDEX, Batch, lm_loss, make_batch
from fedsea.training.decoder import SplitDecoder
from fedsea.training.generation import (
    GenerationConfig,
    GenerationOutput,
    GenerationStep,
    generate,
    generate_steps,
    greedy_generate,
    split_greedy_generate,
    stream_text,
)
from fedsea.training.step import CentralTrainer, LocalTrunk, SplitTrainer, StepResult, TrunkLink
from fedsea.training.stepper import CutTraffic, LocalStepper, TrunkStepper, rewind_cache

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "CentralTrainer",
    "CutTraffic",
    "GenerationConfig",
    "GenerationOutput",
    "GenerationStep",
    "LocalStepper",
    "LocalTrunk",
    "SplitDecoder",
    "SplitTrainer",
    "StepResult",
    "TrunkLink",
    "TrunkStepper",
    "generate",
    "generate_steps",
    "greedy_generate",
    "lm_loss",
    "make_batch",
    "rewind_cache",
    "split_greedy_generate",
    "stream_text",
]
