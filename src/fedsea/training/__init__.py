"""Training steps shared by the split client and the centralized baseline, and the generation loop.

The names below load on first use: importing a light submodule (``generation_config``, for the
command line's flags) loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsea.lazy import lazy_exports

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
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
    from fedsea.training.shared_parts import JointParts, joint_parts
    from fedsea.training.step import CentralTrainer, LocalTrunk, SplitTrainer, StepResult, TrunkLink
    from fedsea.training.stepper import CutTraffic, LocalStepper, TrunkStepper, rewind_cache

# Public name -> the module that defines it, imported on first access.
_LAZY: dict[str, str] = {
    "IGNORE_INDEX": "fedsea.training.batch",
    "Batch": "fedsea.training.batch",
    "lm_loss": "fedsea.training.batch",
    "make_batch": "fedsea.training.batch",
    "SplitDecoder": "fedsea.training.decoder",
    "GenerationConfig": "fedsea.training.generation_config",
    "GenerationOutput": "fedsea.training.generation",
    "GenerationStep": "fedsea.training.generation",
    "generate": "fedsea.training.generation",
    "generate_steps": "fedsea.training.generation",
    "greedy_generate": "fedsea.training.generation",
    "split_greedy_generate": "fedsea.training.generation",
    "stream_text": "fedsea.training.generation",
    "JointParts": "fedsea.training.shared_parts",
    "joint_parts": "fedsea.training.shared_parts",
    "CentralTrainer": "fedsea.training.step",
    "LocalTrunk": "fedsea.training.step",
    "SplitTrainer": "fedsea.training.step",
    "StepResult": "fedsea.training.step",
    "TrunkLink": "fedsea.training.step",
    "CutTraffic": "fedsea.training.stepper",
    "LocalStepper": "fedsea.training.stepper",
    "TrunkStepper": "fedsea.training.stepper",
    "rewind_cache": "fedsea.training.stepper",
}

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "CentralTrainer",
    "CutTraffic",
    "GenerationConfig",
    "GenerationOutput",
    "GenerationStep",
    "JointParts",
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
    "joint_parts",
    "lm_loss",
    "make_batch",
    "rewind_cache",
    "split_greedy_generate",
    "stream_text",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
