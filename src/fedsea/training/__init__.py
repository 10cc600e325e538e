"""Training steps shared by the split client and the centralized baseline."""

from fedsea.training.batch import IGNORE_INDEX, Batch, lm_loss, make_batch
from fedsea.training.step import CentralTrainer, LocalTrunk, SplitTrainer, StepResult, TrunkLink

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "CentralTrainer",
    "LocalTrunk",
    "SplitTrainer",
    "StepResult",
    "TrunkLink",
    "lm_loss",
    "make_batch",
]
