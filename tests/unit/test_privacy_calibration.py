"""Setting the noise by sigma, relative to h_p's RMS, or by (epsilon, delta); shaped noise's power."""

from __future__ import annotations

import math

import pytest
import torch

import fedsea
from fedsea.privacy.accountant import epsilon_for_sigma
from fedsea.privacy.attacks import encode_texts, head_states
from fedsea.privacy.calibration import (
    CALIBRATION_TOKENS,
    NoiseTarget,
    calibrate,
    describe,
    hidden_rms,
    public_rms,
    resolve_noise,
    token_norm_quantile,
)
from fedsea.privacy.public_text import PUBLIC_TEXT
from fedsea.privacy.shaped import (
    NoiseShape,
    ShapedPrivatizer,
    embedding_basis,
    hidden_shape,
    pca_basis,
    subspace_shape,
    token_basis,
)


def _hidden():
    """(2, 5, 8) with the first row left-padded by 2 slots of huge junk that must be ignored."""
    h = torch.full((2, 5, 8), 2.0)
    h[0, :2] = 1000.0
    return h, torch.tensor([3, 5])


def test_rms_ignores_padding_and_respects_clipping():
    h, lengths = _hidden()
    assert hidden_rms(h, lengths) == pytest.approx(2.0)
    # Each real token has norm 2 * sqrt(8); clipped to 1 its coordinates are 1 / sqrt(8).
    assert hidden_rms(h, lengths, clip_norm=1.0) == pytest.approx(1 / math.sqrt(8))
    assert token_norm_quantile(h, lengths, 0.5) == pytest.approx(2 * math.sqrt(8))


def test_three_modes():
    h, lengths = _hidden()
    by_sigma = calibrate(NoiseTarget(sigma=0.7, seed=3), h, lengths)
    assert by_sigma.noise == fedsea.NoiseConfig(sigma=0.7, seed=3) and by_sigma.epsilon is None
    relative = calibrate(NoiseTarget(relative_sigma=0.5), h, lengths)
    assert relative.noise.sigma == pytest.approx(1.0) and relative.rms == pytest.approx(2.0)
    dp = calibrate(NoiseTarget(epsilon=3.0, delta=1e-5, clip_norm=2.0, releases=10))
    assert dp.epsilon is not None and dp.epsilon <= 3.0 and dp.epsilon == pytest.approx(3.0, rel=1e-4)
    assert dp.noise.clip_norm == 2.0
    assert "epsilon=" in dp.summary() and "10 releases" in dp.summary()


def test_describe_reports_epsilon_only_with_clipping():
    assert describe(fedsea.NoiseConfig(sigma=4.0)).epsilon is None
    report = describe(fedsea.NoiseConfig(sigma=4.0, clip_norm=1.0), releases=3, delta=1e-6)
    assert report.epsilon == pytest.approx(epsilon_for_sigma(4.0, 1.0, 3, 1e-6))
    assert describe(fedsea.NoiseConfig(clip_norm=1.0)).epsilon == math.inf
    assert "undefined" in describe(fedsea.NoiseConfig(sigma=1.0)).summary()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "exactly one"),
        ({"sigma": 1.0, "epsilon": 1.0, "clip_norm": 1.0}, "exactly one"),
        ({"epsilon": 1.0}, "clip_norm"),
        ({"sigma": 1.0, "delta": 1.5}, "delta"),
        ({"sigma": 1.0, "releases": 0}, "releases"),
        ({"relative_sigma": -1.0}, "relative_sigma"),
    ],
)
def test_target_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        NoiseTarget(**kwargs)


def test_relative_needs_hidden_states():
    with pytest.raises(ValueError, match="hidden"):
        calibrate(NoiseTarget(relative_sigma=1.0))


def _random_basis(d: int, k: int, seed: int = 0) -> torch.Tensor:
    return pca_basis(torch.randn(4 * d, d, generator=torch.Generator().manual_seed(seed)), k)[0]


@pytest.mark.parametrize("fraction", [0.25, 0.9, 1.0])
def test_shaped_noise_has_the_requested_total_power_and_split(fraction):
    d, k, sigma = 32, 4, 0.8
    shape = subspace_shape(_random_basis(d, k), fraction)
    assert shape.subspace_fraction == pytest.approx(fraction, rel=1e-5)
    priv = ShapedPrivatizer(fedsea.NoiseConfig(sigma=sigma, seed=0), shape)
    noise = priv(torch.zeros(200, 100, d)).reshape(-1, d)  # 20,000 draws
    power = float(noise.pow(2).sum(dim=1).mean())
    assert power == pytest.approx(sigma**2 * d, rel=0.03)  # same as isotropic noise of std sigma
    inside = float((noise @ shape.basis).pow(2).sum(dim=1).mean())
    assert inside / power == pytest.approx(fraction, rel=0.05, abs=0.005)


def test_isotropic_fraction_gives_isotropic_noise_and_min_std():
    d, k = 16, 4
    shape = subspace_shape(_random_basis(d, k), k / d)
    assert torch.allclose(shape.in_scale, torch.ones(k)) and shape.out_scale == pytest.approx(1.0)
    concentrated = ShapedPrivatizer(fedsea.NoiseConfig(sigma=2.0), subspace_shape(_random_basis(d, k), 0.9))
    assert concentrated.min_std == pytest.approx(2.0 * math.sqrt(0.1 * d / (d - k)))


def test_shaped_privatizer_resends_the_same_tensor_and_keeps_gradients():
    shape = subspace_shape(_random_basis(8, 2), 0.8)
    priv = ShapedPrivatizer(fedsea.NoiseConfig(sigma=1.0, clip_norm=3.0, seed=1), shape)
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    sent = priv(hidden, key=7)
    assert torch.equal(priv.resend(7), sent.detach())
    assert not torch.equal(priv(hidden), sent)  # a new step draws new noise
    sent.sum().backward()
    assert hidden.grad is not None
    other = ShapedPrivatizer(fedsea.NoiseConfig(sigma=1.0, clip_norm=3.0, seed=1), shape)(hidden)
    assert torch.equal(other, sent)  # same seed, same noise


def test_bases_from_embeddings_hidden_states_and_token_means():
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(100, 16, generator=gen)
    basis = embedding_basis(emb, 5)
    assert basis.shape == (16, 5) and torch.allclose(basis.T @ basis, torch.eye(5), atol=1e-5)
    hidden = torch.randn(4, 6, 16, generator=gen)
    ids = torch.randint(0, 10, (4, 6), generator=gen)
    lengths = torch.tensor([6, 4, 5, 6])
    assert token_basis(hidden, ids, lengths, 3).shape == (16, 3)
    shape = hidden_shape(hidden, lengths, 4, 0.7)
    assert shape.subspace_fraction == pytest.approx(0.7, rel=1e-5)
    with pytest.raises(ValueError, match="orthonormal"):
        NoiseShape(torch.ones(4, 2), torch.ones(2), 1.0)


def test_public_rms_is_hidden_rms_of_the_head_on_the_public_text():
    model = fedsea.tiny_llama(seed=0)
    tokenizer = fedsea.load_tokenizer("tiny-llama")
    head = fedsea.split_model(model, 2, 1).head
    ids = encode_texts(tokenizer, PUBLIC_TEXT, CALIBRATION_TOKENS)
    assert len(ids) == len(PUBLIC_TEXT) and all(len(s) == CALIBRATION_TOKENS for s in ids)
    states = head_states(head, ids, tokenizer.pad_token_id)
    assert public_rms(head, tokenizer) == pytest.approx(hidden_rms(states.hidden, states.lengths))
    assert public_rms(head, tokenizer, clip_norm=0.5) == pytest.approx(0.5 / math.sqrt(64), rel=1e-4)
    with pytest.raises(ValueError, match="no sequence"):
        public_rms(head, tokenizer, texts=["a"])


def test_resolve_noise_in_each_mode_reports_the_measured_rms():
    model = fedsea.tiny_llama(seed=0)
    tokenizer = fedsea.load_tokenizer("tiny-llama")
    head = fedsea.split_model(model, 1, 1).head
    rms = public_rms(head, tokenizer)
    relative = resolve_noise(NoiseTarget(relative_sigma=2.0, seed=3), head, tokenizer)
    assert relative.mode == "relative" and relative.rms == pytest.approx(rms)
    assert relative.noise.sigma == pytest.approx(2.0 * rms) and relative.noise.seed == 3
    assert relative.epsilon is None and "sigma/rms=2" in relative.summary()
    absolute = resolve_noise(NoiseTarget(sigma=0.3), head, tokenizer)
    assert absolute.noise.sigma == 0.3 and absolute.rms == pytest.approx(rms)
    dp = resolve_noise(NoiseTarget(epsilon=8.0, clip_norm=1.0, releases=3), head, tokenizer)
    assert dp.mode == "dp" and dp.epsilon == pytest.approx(8.0, rel=1e-3) and dp.releases == 3
    assert dp.rms == pytest.approx(public_rms(head, tokenizer, clip_norm=1.0))
    assert dp.noise.sigma == pytest.approx(calibrate(NoiseTarget(epsilon=8.0, clip_norm=1.0, releases=3)).noise.sigma)
