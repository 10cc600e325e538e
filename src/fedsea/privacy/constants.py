"""Names of the privacy settings, without torch: run files and ``--help`` check and show them.

``fedsea.privacy.regularizers`` re-exports ``HEAD_REGULARIZERS``; ``NoiseTarget`` defaults to ``DEFAULT_DELTA``.
"""

from __future__ import annotations

# The privacy losses a client's head may train with (``fedsea.privacy.regularizers.make_head_regularizer``).
HEAD_REGULARIZERS: tuple[str, ...] = ("none", "nopeek", "adversarial")
# The delta epsilon is reported (or targeted) at by default (``fedsea.privacy.calibration.NoiseTarget``).
DEFAULT_DELTA = 1e-5

__all__ = ["DEFAULT_DELTA", "HEAD_REGULARIZERS"]
