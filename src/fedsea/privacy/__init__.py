"""Privacy at the client's boundary and its measurement.

- ``noise``: per-token clipping and Gaussian noise (``Privatizer``), the one boundary, and
  ``make_privatizer``, the one place a client's privatizers are made and seeded;
- ``shaped``: noise concentrated in the directions that identify tokens (``ShapedPrivatizer``);
- ``accountant`` and ``calibration``: a Renyi-DP accountant for the Gaussian mechanism, and
  noise set by sigma, by sigma relative to h_p's RMS, or by a target (epsilon, delta);
- ``regularizers``: privacy-training losses on the head (NoPeek, adversarial probe);
- ``attacks``: learned inversion, per-token probe, optimization attacks; ``grid``: the sweep.
"""

from fedsea.privacy.noise import Privatizer, clip_per_token, derived_seed, make_privatizer, privatize

__all__ = ["Privatizer", "clip_per_token", "derived_seed", "make_privatizer", "privatize"]
