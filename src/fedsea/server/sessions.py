"""A client's training session on the trunk host: what it asked for and what it holds.

(Kept apart from ``fedsea.server.trunk``, which re-exports both, to keep that module small.)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from peft.tuners.tuners_utils import BaseTunerLayer

from fedsea.config import LoraSpec, OptimConfig
from fedsea.model.split import Trunk
from fedsea.training.pipeline import MicroStep
from fedsea.training.step import PartOptimizer


@dataclass(frozen=True)
class SessionSpec:
    """What a client asks for when it opens a training session."""

    head_layers: int
    tail_layers: int
    lora: LoraSpec
    optim: OptimConfig
    wire_dtype: int
    seed: int = 0
    # TensorChunk.Compression both ends may send this session's tensors in; 0 (NONE): exact only.
    wire_compression: int = 0


@dataclass
class Session:
    """One client's open training session on the trunk."""

    id: str
    owner: str
    spec: SessionSpec
    trunk: Trunk
    optimizer: PartOptimizer
    tuner_layers: Sequence[BaseTunerLayer]
    last_used: float = field(default_factory=time.monotonic)
    next_step: int = 0
    pending: MicroStep | None = None  # the step in flight: its slices' graphs (one slice unless pipelined)
    answered: MicroStep | None = None  # the last finished step, its answers kept for resends
    pending_bytes: dict[int, int] = field(default_factory=dict)  # saved activation bytes per pending slice
    pending_at: float = 0.0  # when the pending step's last forward came (monotonic)
    expired_step: int | None = None  # a step whose activations expired before its backward

    @property
    def adapter_name(self) -> str:
        """The peft adapter name of this session's trunk LoRA."""
        return f"s_{self.id}"


__all__ = ["Session", "SessionSpec"]
