"""The RDP accountant of the Gaussian mechanism against reference values.

References:
- Opacus 1.6.0, ``opacus.accountants.analysis.rdp``: ``compute_rdp(q=1.0, noise_multiplier=z,
  steps=k, orders=RDPAccountant.DEFAULT_ALPHAS)`` then ``get_privacy_spent(orders, rdp, delta)``.
  With q = 1 (no subsampling) ``compute_rdp`` is ``k * alpha / (2 z^2)`` and
  ``get_privacy_spent`` is the conversion of Balle et al. 2020 (Thm. 21):
  ``eps = min_alpha rdp(alpha) - (log delta + log alpha) / (alpha - 1) + log((alpha - 1) / alpha)``.
  The numbers below were produced by running exactly that code (Opacus 1.6.0).
- Mironov 2017 (Prop. 3), minimised over continuous alpha: with rho = k Delta^2 / (2 sigma^2),
  ``eps = rho + 2 sqrt(rho log(1/delta))`` (the zCDP conversion, Bun & Steinke 2016).
"""

from __future__ import annotations

import math

import pytest

from fedsea.privacy.accountant import (
    OPACUS_ORDERS,
    RdpAccountant,
    epsilon_for_sigma,
    gaussian_rdp,
    gdp_epsilon,
    rdp_to_dp,
    sensitivity,
    sigma_for_epsilon,
)

# (noise multiplier z, releases k, delta, Opacus 1.6.0 epsilon, Opacus' best order)
OPACUS_REFERENCE = [
    (1.0, 1, 1e-5, 4.728507067217623, 5.4),
    (2.0, 10, 1e-5, 8.079406222420491, 3.9),
    (5.0, 100, 1e-6, 11.68862679916635, 3.5),
    (0.8, 3, 1e-3, 9.328394580439985, 2.6),
    (10.0, 1000, 1e-5, 19.05359753163139, 2.5),
]


def _opacus_by_hand(z: float, k: int, delta: float) -> float:
    """Balle et al. 2020 (Thm. 21) over Opacus' orders, written out independently."""
    best = math.inf
    for a in OPACUS_ORDERS:
        rdp = k * a / (2 * z * z)
        best = min(best, rdp - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a))
    return best


def test_opacus_orders_are_opacus_default_alphas():
    assert len(OPACUS_ORDERS) == 99 + 52
    assert OPACUS_ORDERS[0] == pytest.approx(1.1) and OPACUS_ORDERS[98] == pytest.approx(10.9)
    assert OPACUS_ORDERS[99] == 12 and OPACUS_ORDERS[-1] == 63


@pytest.mark.parametrize(("z", "k", "delta", "expected", "order"), OPACUS_REFERENCE)
def test_matches_opacus_rdp_analysis(z, k, delta, expected, order):
    eps, best_order = rdp_to_dp(OPACUS_ORDERS, k * gaussian_rdp(z, OPACUS_ORDERS), delta)
    assert eps == pytest.approx(expected, rel=1e-12)
    assert best_order == pytest.approx(order)
    assert eps == pytest.approx(_opacus_by_hand(z, k, delta), rel=1e-12)


@pytest.mark.parametrize(("z", "k", "delta", "expected", "order"), OPACUS_REFERENCE)
def test_accountant_composes_releases_like_opacus_steps(z, k, delta, expected, order):
    acct = RdpAccountant(orders=OPACUS_ORDERS)
    for _ in range(3):
        acct.step(noise_multiplier=z, releases=1)
    acct.step(noise_multiplier=z, releases=k)  # k + 3 releases in all
    eps_direct = rdp_to_dp(OPACUS_ORDERS, (k + 3) * gaussian_rdp(z, OPACUS_ORDERS), delta)[0]
    assert acct.get_epsilon(delta) == pytest.approx(eps_direct, rel=1e-12)


@pytest.mark.parametrize(("z", "k", "delta", "expected", "order"), OPACUS_REFERENCE)
def test_fine_orders_never_worse_than_opacus_orders(z, k, delta, expected, order):
    # epsilon_for_sigma takes sigma and a clip norm: sensitivity 2C, so sigma = z * 2C.
    fine = epsilon_for_sigma(sigma=z * 2 * 0.5, clip_norm=0.5, releases=k, delta=delta)
    assert fine <= expected + 1e-9
    assert fine == pytest.approx(expected, rel=2e-3)


@pytest.mark.parametrize(
    ("sigma", "clip", "k", "delta"), [(2.0, 0.5, 1, 1e-5), (3.0, 1.0, 20, 1e-6), (50.0, 4.0, 5, 1e-5)]
)
def test_standard_conversion_matches_closed_form(sigma, clip, k, delta):
    rho = k * sensitivity(clip) ** 2 / (2 * sigma**2)
    expected = rho + 2 * math.sqrt(rho * math.log(1 / delta))
    got = epsilon_for_sigma(sigma, clip, k, delta, conversion="standard")
    assert got == pytest.approx(expected, rel=1e-5)


def test_improved_is_tighter_than_standard_and_looser_than_exact():
    for sigma, k in [(2.0, 1), (4.0, 10), (20.0, 100)]:
        improved = epsilon_for_sigma(sigma, 1.0, k, 1e-5)
        standard = epsilon_for_sigma(sigma, 1.0, k, 1e-5, conversion="standard")
        exact = gdp_epsilon(sigma, 1.0, k, 1e-5)
        assert exact < improved < standard


def test_exact_gaussian_reference_value():
    # One Gaussian release with Delta = sigma (mu = 1): the analytic Gaussian mechanism gives
    # delta(eps=1) = Phi(-1/2) - e Phi(-3/2) = 0.30854 - 2.71828 * 0.06681 = 0.12693.
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    delta = phi(-0.5) - math.e * phi(-1.5)
    assert delta == pytest.approx(0.12693, abs=1e-5)
    assert gdp_epsilon(sigma=2.0, clip_norm=1.0, releases=1, delta=delta) == pytest.approx(1.0, rel=1e-6)


def test_sigma_for_epsilon_inverts_epsilon_for_sigma():
    for eps, k, clip in [(1.0, 1, 1.0), (8.0, 30, 5.0), (0.5, 3, 0.1)]:
        sigma = sigma_for_epsilon(eps, 1e-5, k, clip)
        assert epsilon_for_sigma(sigma, clip, k, 1e-5) <= eps
        assert epsilon_for_sigma(sigma * 0.999, clip, k, 1e-5) > eps


def test_sensitivity_and_composition_scaling():
    assert sensitivity(1.5) == 3.0
    assert sensitivity(1.0, rows=16) == pytest.approx(8.0)
    # k releases at sigma cost what one release at sigma / sqrt(k) costs.
    assert epsilon_for_sigma(4.0, 1.0, 16, 1e-5) == pytest.approx(epsilon_for_sigma(1.0, 1.0, 1, 1e-5), rel=1e-9)
    # More noise, fewer releases, fewer rows: never more epsilon.
    assert epsilon_for_sigma(8.0, 1.0, 4, 1e-5) < epsilon_for_sigma(4.0, 1.0, 4, 1e-5)
    assert epsilon_for_sigma(4.0, 1.0, 4, 1e-5, rows=4) > epsilon_for_sigma(4.0, 1.0, 4, 1e-5)
    assert epsilon_for_sigma(0.0, 1.0, 1, 1e-5) == math.inf


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sigma": 1.0, "clip_norm": 1.0, "releases": 0, "delta": 1e-5}, "releases"),
        ({"sigma": 1.0, "clip_norm": 1.0, "releases": 1, "delta": 0.0}, "delta"),
        ({"sigma": 1.0, "clip_norm": 0.0, "releases": 1, "delta": 1e-5}, "clip_norm"),
        ({"sigma": -1.0, "clip_norm": 1.0, "releases": 1, "delta": 1e-5}, "sigma"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        epsilon_for_sigma(**kwargs)
