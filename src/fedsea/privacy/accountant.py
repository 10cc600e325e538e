"""Rényi-DP accounting for the Gaussian mechanism on h_p, composed over releases.

What is accounted: each time a token's clipped head output is sent up with Gaussian noise
of standard deviation sigma, that is one release of a Gaussian mechanism with L2
sensitivity ``Delta`` (see ``sensitivity``). A token's representation released k times
(k epochs, evaluation passes, generation prefills) is the k-fold composition.

Design decisions:
- RDP of the Gaussian mechanism with noise multiplier z = sigma / Delta is exactly
  ``eps(alpha) = alpha / (2 z^2)`` at every order alpha > 1 (Mironov 2017, Prop. 7), and
  composes additively (Prop. 1). No subsampling amplification is claimed: which sequences
  are in a batch is not secret from the server.
- Conversion to (epsilon, delta): ``"improved"`` is Balle et al. 2020 (Thm. 21), the one
  Opacus' ``get_privacy_spent`` uses; ``"standard"`` is Mironov 2017 (Prop. 3),
  ``eps = rdp + log(1/delta) / (alpha - 1)``.
- The RDP of the plain Gaussian is closed-form at every alpha, so by default the orders are
  a fine geometric grid (4,000 points, alpha - 1 in [1e-3, 1e6]) rather than Opacus' 150;
  ``OPACUS_ORDERS`` reproduces Opacus' numbers exactly.
- ``gdp_epsilon`` is the *tight* (epsilon, delta) curve of the composed Gaussian
  (mu-GDP with mu = sqrt(k) / z, Dong, Roth & Su 2019): a cross-check, and a floor that no
  RDP conversion can go below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedsea.privacy.constants import CONVERSIONS as CONVERSIONS  # RDP to (epsilon, delta), the first the default

# Opacus' RDPAccountant.DEFAULT_ALPHAS (opacus/accountants/rdp.py).
OPACUS_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)])
# A fine grid: for the plain Gaussian the optimum order is 1 + sqrt(log(1/delta) / rho), anywhere.
FINE_ORDERS: tuple[float, ...] = tuple((1.0 + np.geomspace(1e-3, 1e6, 4000)).tolist())


def _check_delta(delta: float) -> None:
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_releases(releases: int) -> None:
    if not isinstance(releases, int) or isinstance(releases, bool) or releases < 1:
        raise ValueError(f"releases must be an integer >= 1, got {releases!r}")


def sensitivity(clip_norm: float, rows: int = 1) -> float:
    """L2 sensitivity of the clipped head output under replace-one neighbours.

    Each released row (one position's vector of h_p) is clipped to L2 norm ``clip_norm``, so
    replacing the data behind one row moves it by at most ``2 * clip_norm``; a protected unit
    that can change ``rows`` rows (a whole sequence, or one input token under causal
    attention, which reaches every later position) moves the tensor by at most
    ``2 * clip_norm * sqrt(rows)``.

    Args:
        clip_norm: per-token L2 clip norm C.
        rows: how many released rows one protected unit can change (1: one position's vector).
    """
    _check_positive("clip_norm", clip_norm)
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ValueError(f"rows must be an integer >= 1, got {rows!r}")
    return 2.0 * clip_norm * math.sqrt(rows)


def gaussian_rdp(noise_multiplier: float, orders: Sequence[float] = FINE_ORDERS) -> np.ndarray:
    """RDP of one Gaussian mechanism at each order: ``alpha / (2 z^2)`` (Mironov 2017, Prop. 7).

    Args:
        noise_multiplier: z = sigma / sensitivity.
        orders: Rényi orders alpha > 1.
    """
    _check_positive("noise_multiplier", noise_multiplier)
    alphas = np.asarray(orders, dtype=np.float64)
    if alphas.ndim != 1 or alphas.size == 0 or bool((alphas <= 1).any()):
        raise ValueError("orders must be a non-empty sequence of numbers > 1")
    return alphas / (2.0 * noise_multiplier**2)


def rdp_to_dp(
    orders: Sequence[float], rdp: Sequence[float] | np.ndarray, delta: float, conversion: str = "improved"
) -> tuple[float, float]:
    """Smallest epsilon over the orders such that the mechanism is (epsilon, delta)-DP.

    Args:
        orders: Rényi orders alpha > 1.
        rdp: RDP epsilon at each order (already composed).
        delta: target delta in (0, 1).
        conversion: ``"improved"`` (Balle et al. 2020, Thm. 21; Opacus'
            ``get_privacy_spent``) or ``"standard"`` (Mironov 2017, Prop. 3).

    Returns:
        (epsilon, the order that attains it); epsilon is clamped at 0.
    """
    _check_delta(delta)
    if conversion not in CONVERSIONS:
        raise ValueError(f"conversion must be one of {CONVERSIONS}, got {conversion!r}")
    alphas = np.asarray(orders, dtype=np.float64)
    values = np.asarray(rdp, dtype=np.float64)
    if alphas.shape != values.shape or alphas.ndim != 1:
        raise ValueError(f"orders and rdp must be 1-D of one length, got {alphas.shape} and {values.shape}")
    if conversion == "improved":
        eps = values - (math.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    else:
        eps = values + math.log(1.0 / delta) / (alphas - 1)
    best = int(np.nanargmin(eps))
    return max(0.0, float(eps[best])), float(alphas[best])


class RdpAccountant:
    """Composes Gaussian releases and reports (epsilon, delta).

    Args:
        orders: Rényi orders at which RDP is tracked.
        conversion: RDP to (epsilon, delta) conversion, see ``rdp_to_dp``.

    Example::

        acct = RdpAccountant()
        acct.step(noise_multiplier=sigma / sensitivity(clip_norm), releases=epochs)
        epsilon = acct.get_epsilon(delta=1e-5)
    """

    def __init__(self, orders: Sequence[float] = FINE_ORDERS, conversion: str = "improved") -> None:
        if conversion not in CONVERSIONS:
            raise ValueError(f"conversion must be one of {CONVERSIONS}, got {conversion!r}")
        self.orders = tuple(float(a) for a in orders)
        self.conversion = conversion
        self.history: list[tuple[float, int]] = []  # (noise multiplier, releases)

    def step(self, noise_multiplier: float, releases: int = 1) -> None:
        """Record ``releases`` Gaussian releases with noise multiplier sigma / sensitivity."""
        _check_positive("noise_multiplier", noise_multiplier)
        _check_releases(releases)
        self.history.append((float(noise_multiplier), releases))

    def rdp(self) -> np.ndarray:
        """Composed RDP at each order (zeros when nothing was released)."""
        total = np.zeros(len(self.orders), dtype=np.float64)
        for z, k in self.history:
            total += k * gaussian_rdp(z, self.orders)
        return total

    def get_epsilon(self, delta: float) -> float:
        """Epsilon of everything recorded so far, at ``delta``."""
        return rdp_to_dp(self.orders, self.rdp(), delta, self.conversion)[0]


def epsilon_for_sigma(
    sigma: float,
    clip_norm: float,
    releases: int,
    delta: float,
    rows: int = 1,
    conversion: str = "improved",
    orders: Sequence[float] = FINE_ORDERS,
) -> float:
    """Epsilon spent by ``releases`` clipped, noised releases of each token's representation.

    Args:
        sigma: standard deviation of the noise per coordinate.
        clip_norm: per-token L2 clip norm C; sensitivity is ``2 C sqrt(rows)``.
        releases: how many times each protected representation is sent.
        delta: target delta.
        rows: rows one protected unit can change (see ``sensitivity``).
        conversion: see ``rdp_to_dp``.
        orders: Rényi orders to optimise over.

    Returns:
        epsilon (``inf`` when sigma is 0).
    """
    _check_releases(releases)
    _check_delta(delta)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if sigma == 0:
        return math.inf
    z = sigma / sensitivity(clip_norm, rows)
    return rdp_to_dp(orders, releases * gaussian_rdp(z, orders), delta, conversion)[0]


def sigma_for_epsilon(
    epsilon: float,
    delta: float,
    releases: int,
    clip_norm: float,
    rows: int = 1,
    conversion: str = "improved",
    orders: Sequence[float] = FINE_ORDERS,
    rel_tol: float = 1e-6,
) -> float:
    """Smallest sigma (up to ``rel_tol``) whose composed epsilon is <= ``epsilon``.

    Epsilon decreases monotonically in sigma, so this is a bisection on log(sigma).

    Args:
        epsilon: target epsilon > 0.
        delta: target delta in (0, 1).
        releases: how many times each protected representation is sent.
        clip_norm: per-token L2 clip norm C.
        rows: rows one protected unit can change (see ``sensitivity``).
        conversion: see ``rdp_to_dp``.
        orders: Rényi orders to optimise over.
        rel_tol: relative precision of the returned sigma.
    """
    _check_positive("epsilon", epsilon)

    def eps_at(s: float) -> float:
        return epsilon_for_sigma(s, clip_norm, releases, delta, rows, conversion, orders)

    delta_l2 = sensitivity(clip_norm, rows)
    lo, hi = delta_l2 * 1e-3, delta_l2
    while eps_at(hi) > epsilon:  # grow until feasible
        lo, hi = hi, hi * 4
        if hi > delta_l2 * 1e12:
            raise ValueError(f"no sigma reaches epsilon={epsilon} with the given orders; widen them")
    while eps_at(lo) <= epsilon and lo > delta_l2 * 1e-12:  # shrink until infeasible
        hi, lo = lo, lo / 4
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps_at(mid) <= epsilon else (mid, hi)
    return hi


def _log_normal_cdf(x: float) -> float:
    """log Phi(x), accurate in the far left tail (asymptotic series below x = -30)."""
    if x > -30:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2)))
    return -0.5 * x * x - math.log(-x) - 0.5 * math.log(2 * math.pi) + math.log1p(-1 / (x * x))


def gdp_delta(epsilon: float, mu: float) -> float:
    """Tight delta(epsilon) of a mu-GDP mechanism (Dong, Roth & Su 2019, Cor. 2.13).

    ``delta = Phi(-eps/mu + mu/2) - exp(eps) Phi(-eps/mu - mu/2)``.
    """
    a = -epsilon / mu + mu / 2
    b = -epsilon / mu - mu / 2
    return max(0.0, math.exp(_log_normal_cdf(a)) - math.exp(epsilon + _log_normal_cdf(b)))


def gdp_epsilon(sigma: float, clip_norm: float, releases: int, delta: float, rows: int = 1) -> float:
    """The exact epsilon of k composed Gaussian releases (no RDP slack): a lower bound for RDP.

    The k-fold composition of Gaussian mechanisms with noise multiplier z is mu-GDP with
    ``mu = sqrt(k) / z`` (Dong, Roth & Su 2019, Cor. 3.3); epsilon solves ``gdp_delta = delta``.
    """
    _check_releases(releases)
    _check_delta(delta)
    _check_positive("sigma", sigma)
    mu = math.sqrt(releases) * sensitivity(clip_norm, rows) / sigma
    if gdp_delta(0.0, mu) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(hi, mu) > delta:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gdp_delta(mid, mu) > delta else (lo, mid)
    return hi
