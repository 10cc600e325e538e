"""``NoiseTarget``: what the user asks of the noise on h_p (``fedsea.privacy.calibration`` resolves it).

Apart from the calibration, and without torch or numpy, so that a run file's schema
(``fedsea.federation.runconfig``) and ``fedsea --help`` load in a fraction of a second;
``fedsea.privacy.calibration`` re-exports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedsea.privacy.constants import CONVERSIONS, DEFAULT_DELTA


@dataclass(frozen=True)
class NoiseTarget:
    """What the user asks of the noise; exactly one of ``sigma``, ``relative_sigma``, ``epsilon``.

    Args:
        sigma (`float | None`): absolute standard deviation per coordinate.
        relative_sigma (`float | None`): sigma as a multiple of h_p's per-coordinate RMS.
        epsilon (`float | None`): target epsilon; needs ``clip_norm``.
        delta (`float`, defaults to 1e-5): the delta epsilon is reported (or targeted) at.
        clip_norm (`float | None`): per-token L2 clip norm C (bounds the sensitivity at 2C).
        releases (`int`, defaults to 1): how many times each token's representation is sent
            (epochs x passes); the accountant composes over them.
        rows (`int`, defaults to 1): rows of h_p one protected unit can change: 1 protects one
            position's vector; a sequence length n protects a whole sequence (and any single
            input token, which causal attention spreads over later positions).
        seed (`int | None`): seed of the noise generator.
        conversion (`str`, defaults to "improved"): RDP to (epsilon, delta) conversion.
    """

    sigma: float | None = None
    relative_sigma: float | None = None
    epsilon: float | None = None
    delta: float = DEFAULT_DELTA
    clip_norm: float | None = None
    releases: int = 1
    rows: int = 1
    seed: int | None = None
    conversion: str = "improved"

    def __post_init__(self) -> None:
        given = [n for n in ("sigma", "relative_sigma", "epsilon") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"exactly one of sigma, relative_sigma, epsilon must be set, got {given or 'none'}")
        if self.sigma is not None and not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma!r}")
        if self.relative_sigma is not None and not (math.isfinite(self.relative_sigma) and self.relative_sigma >= 0):
            raise ValueError(f"relative_sigma must be a finite number >= 0, got {self.relative_sigma!r}")
        if self.epsilon is not None:
            if not (math.isfinite(self.epsilon) and self.epsilon > 0):
                raise ValueError(f"epsilon must be a finite number > 0, got {self.epsilon!r}")
            if self.clip_norm is None:
                raise ValueError("clip_norm must be set when epsilon is: without clipping the sensitivity is unbounded")
        if not (0.0 < self.delta < 1.0):
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be a finite number > 0 or None, got {self.clip_norm!r}")
        for name in ("releases", "rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.conversion not in CONVERSIONS:
            raise ValueError(f"conversion must be one of {CONVERSIONS}, got {self.conversion!r}")

    @property
    def mode(self) -> str:
        """Which field sets the noise: ``"sigma"``, ``"relative"`` or ``"dp"`` (epsilon)."""
        if self.sigma is not None:
            return "sigma"
        return "relative" if self.relative_sigma is not None else "dp"


__all__ = ["NoiseTarget"]
