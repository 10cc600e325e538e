"""Privacy at the client's boundary: clipping and Gaussian noise (attacks and accounting come later)."""

from fedsea.privacy.noise import Privatizer, clip_per_token, privatize

__all__ = ["Privatizer", "clip_per_token", "privatize"]
