"""Gaussian noise and per-token clipping at the client's boundary."""

from __future__ import annotations

import pytest
import torch

import fedsea
from fedsea.privacy.noise import clip_per_token


def test_empirical_std_within_five_percent_of_sigma():
    sigma = 0.7
    hidden = torch.zeros(4, 25, 1000)  # 1e5 coordinates
    noised = fedsea.Privatizer(fedsea.NoiseConfig(sigma=sigma, seed=0))(hidden)
    assert noised.numel() == 100_000
    assert abs(float(noised.std()) - sigma) <= 0.05 * sigma
    assert abs(float(noised.mean())) < 0.01


def test_same_seed_same_noise_other_seed_other_noise():
    hidden = torch.randn(2, 3, 8)
    a = fedsea.Privatizer(fedsea.NoiseConfig(sigma=1.0, seed=5))(hidden)
    b = fedsea.Privatizer(fedsea.NoiseConfig(sigma=1.0, seed=5))(hidden)
    c = fedsea.Privatizer(fedsea.NoiseConfig(sigma=1.0, seed=6))(hidden)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sigma_zero_is_the_identity():
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    assert fedsea.privatize(hidden, fedsea.NoiseConfig(), None) is hidden


def test_clip_bound_holds_and_short_vectors_are_untouched():
    hidden = torch.randn(8, 16, 32) * torch.logspace(-2, 2, 16).view(1, 16, 1)
    clipped = clip_per_token(hidden, 1.5)
    norms = clipped.norm(dim=-1)
    assert float(norms.max()) <= 1.5 * (1 + 1e-6)
    short = hidden.norm(dim=-1) <= 1.5
    assert short.any() and torch.allclose(clipped[short], hidden[short])
    # Direction is kept.
    cos = torch.nn.functional.cosine_similarity(clipped, hidden, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    assert torch.equal(clip_per_token(torch.zeros(2, 4), 1.0), torch.zeros(2, 4))


def test_clip_then_noise_and_gradient_flows_through_clip():
    hidden = (torch.randn(2, 5, 16) * 10).requires_grad_(True)
    out = fedsea.Privatizer(fedsea.NoiseConfig(sigma=0.1, clip_norm=1.0, seed=1))(hidden)
    out.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    noise_free = clip_per_token(hidden.detach(), 1.0)
    assert 0.05 < float((out.detach() - noise_free).std()) < 0.15


def test_retry_resends_the_exact_payload():
    privatizer = fedsea.Privatizer(fedsea.NoiseConfig(sigma=1.0, seed=2), keep=2)
    hidden = torch.randn(1, 4, 8)
    first = privatizer(hidden, key=10).detach()
    assert torch.equal(privatizer.resend(10), first)
    # Calling the privatizer again would draw fresh noise: exactly what a retry must not do.
    assert not torch.equal(privatizer(hidden, key=11).detach(), first)
    privatizer(hidden, key=12)
    with pytest.raises(KeyError, match="10"):
        privatizer.resend(10)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"sigma": -1.0}, "sigma"), ({"sigma": float("nan")}, "sigma"), ({"clip_norm": 0.0}, "clip_norm")],
)
def test_bad_noise_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        fedsea.NoiseConfig(**kwargs)


def test_noise_secret_file_is_made_once_owner_only_and_read_back(tmp_path):
    from fedsea.federation.client import load_noise_secret

    path = tmp_path / "client" / "noise.secret"
    secret = load_noise_secret(path)
    assert len(secret) == 64 and int(secret, 16) >= 0
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_noise_secret(path) == secret  # a resumed client reads the same secret
    assert load_noise_secret(tmp_path / "other.secret") != secret
    path.write_text("short\n")
    with pytest.raises(ValueError, match="holds no noise secret"):
        load_noise_secret(path)
