"""Names and defaults of the privacy settings, without torch or numpy: run files and ``--help``
check and show them. ``fedsea.privacy.regularizers`` re-exports ``HEAD_REGULARIZERS``,
``fedsea.privacy.accountant`` ``CONVERSIONS``.
"""

from __future__ import annotations

# The privacy losses a client's head may train with (``fedsea.privacy.regularizers.make_head_regularizer``).
HEAD_REGULARIZERS: tuple[str, ...] = ("none", "nopeek", "adversarial")
# RDP to (epsilon, delta) conversions of ``fedsea.privacy.accountant``, the first the default.
CONVERSIONS: tuple[str, ...] = ("improved", "standard")
# The delta epsilon is reported (or targeted) at by default (``fedsea.privacy.target.NoiseTarget``).
DEFAULT_DELTA = 1e-5

__all__ = ["CONVERSIONS", "DEFAULT_DELTA", "HEAD_REGULARIZERS"]
