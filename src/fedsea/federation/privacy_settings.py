"""The ``[privacy]`` table of a run file: privacy-trained heads (PRIVACY.md); re-exported by ``runconfig``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedsea.privacy.constants import HEAD_REGULARIZERS


@dataclass(frozen=True)
class PrivacySettings:
    """Privacy-trained heads (PRIVACY.md).

    Args:
        head_regularizer: ``none``, ``nopeek`` or ``adversarial``: a privacy loss each client's head
            trains with.
        regularizer_weight: its weight (a finite number >= 0).
    """

    head_regularizer: str = "none"
    regularizer_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.head_regularizer not in HEAD_REGULARIZERS:
            raise ValueError(
                f"head_regularizer must be one of {', '.join(HEAD_REGULARIZERS)}, got {self.head_regularizer!r}"
            )
        if not (math.isfinite(self.regularizer_weight) and self.regularizer_weight >= 0):
            raise ValueError(f"regularizer_weight must be a finite number >= 0, got {self.regularizer_weight!r}")
