"""Privacy at the client's boundary and its measurement.

- ``noise``: per-token clipping and Gaussian noise (``Privatizer``), the one boundary, and
  ``make_privatizer``, the one place a client's privatizers are made and seeded;
- ``shaped``: noise concentrated in the directions that identify tokens (``ShapedPrivatizer``);
- ``accountant`` and ``calibration``: a Renyi-DP accountant for the Gaussian mechanism, and
  noise set by sigma, by sigma relative to h_p's RMS, or by a target (epsilon, delta);
- ``regularizers``: privacy-training losses on the head (NoPeek, adversarial probe);
- ``attacks``: learned inversion, per-token probe, optimization attacks; ``grid``: the sweep.

The names below load on first use: importing a light submodule (``constants``) loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsea.lazy import lazy_exports

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from fedsea.privacy.noise import Privatizer, clip_per_token, derived_seed, make_privatizer, privatize

# Public name -> the module that defines it, imported on first access.
_LAZY: dict[str, str] = {
    "Privatizer": "fedsea.privacy.noise",
    "clip_per_token": "fedsea.privacy.noise",
    "derived_seed": "fedsea.privacy.noise",
    "make_privatizer": "fedsea.privacy.noise",
    "privatize": "fedsea.privacy.noise",
}

__all__ = ["Privatizer", "clip_per_token", "derived_seed", "make_privatizer", "privatize"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
