"""Choosing the noise: by sigma, by sigma relative to h_p's scale, or by a (epsilon, delta) target.

An absolute sigma means very different things at different cut points (in SmolLM2 the
per-coordinate RMS of h_p is ~2 at p = 1 and ~8 at p = 3), so fedsea offers three ways
to set it, all ending in the same ``NoiseConfig``:

- ``NoiseTarget(sigma=...)``: the standard deviation per coordinate, as given;
- ``NoiseTarget(relative_sigma=r)``: ``sigma = r * rms``, where rms is the per-coordinate RMS
  of h_p over real tokens (after clipping, when a clip norm is set), measured on given
  hidden states;
- ``NoiseTarget(epsilon=..., delta=..., clip_norm=..., releases=k)``: the smallest sigma whose
  k-fold Gaussian composition is (epsilon, delta)-DP under ``fedsea.privacy.accountant``.

Every calibration is reported (``Calibration.summary``) with its sigma, clip norm and, where
clipping makes it meaningful, its epsilon.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from fedsea.config import RECOMMENDED_RELATIVE_SIGMA, NoiseConfig
from fedsea.model.masks import padding_mask
from fedsea.privacy import accountant
from fedsea.privacy.noise import clip_per_token
from fedsea.privacy.target import NoiseTarget as NoiseTarget

if TYPE_CHECKING:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    from fedsea.model.split import Head

MODES: tuple[str, ...] = ("sigma", "relative", "dp")
__all__ = [
    "CALIBRATION_TOKENS",
    "MODES",
    "RECOMMENDED_RELATIVE_SIGMA",
    "Calibration",
    "NoiseTarget",
    "calibrate",
    "describe",
    "hidden_rms",
    "public_rms",
    "real_token_rows",
    "resolve_noise",
    "token_norm_quantile",
]

# Tokens kept per calibration text: the attack grid's length, so relative levels agree.
CALIBRATION_TOKENS = 32


@dataclass(frozen=True)
class Calibration:
    """The noise a target resolved to, and what it means.

    Attributes:
        noise: the ``NoiseConfig`` to hand to ``Privatizer``.
        mode: ``"sigma"``, ``"relative"`` or ``"dp"``.
        rms: per-coordinate RMS of the (clipped) h_p that was measured, if any.
        epsilon: epsilon of ``releases`` releases at ``delta``; ``None`` without clipping
            (unbounded sensitivity), ``inf`` with clipping but no noise.
        delta: the delta epsilon refers to.
        releases: releases composed.
        rows: rows of h_p one protected unit can change.
    """

    noise: NoiseConfig
    mode: str
    rms: float | None
    epsilon: float | None
    delta: float
    releases: int
    rows: int

    def to_dict(self) -> dict[str, object]:
        """What a run logs of its noise (the client's log, the run's metrics, ``fedsea train --json``)."""
        return {
            "mode": self.mode,
            "sigma": self.noise.sigma,
            "rms": self.rms,
            "clip_norm": self.noise.clip_norm,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "releases": self.releases,
            "summary": self.summary(),
        }

    def summary(self) -> str:
        """One human-readable line: sigma, clip norm, measured RMS and epsilon at delta."""
        clip = "none" if self.noise.clip_norm is None else f"{self.noise.clip_norm:g}"
        parts = [f"sigma={self.noise.sigma:.4g}", f"clip_norm={clip}"]
        if self.rms is not None:
            parts.append(f"rms(h_p)={self.rms:.4g} (sigma/rms={self.noise.sigma / max(self.rms, 1e-30):.3g})")
        if self.epsilon is None:
            parts.append("epsilon=undefined (no clipping)")
        else:
            unit = "per token row" if self.rows == 1 else f"per {self.rows} rows"
            parts.append(f"epsilon={self.epsilon:.4g} at delta={self.delta:g} over {self.releases} releases, {unit}")
        return ", ".join(parts)


def real_token_rows(hidden: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The real (non-padding) token vectors of a left-padded batch.

    Args:
        hidden: (B, n, d).
        lengths: (B,) real tokens per sequence; ``None`` means no padding.

    Returns:
        (N, d) with N = sum(lengths).
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (batch, tokens, d), got {tuple(hidden.shape)}")
    if lengths is None:
        return hidden.reshape(-1, hidden.shape[-1])
    mask = padding_mask(lengths.to(hidden.device), hidden.shape[1]).bool()  # (B, n)
    return hidden[mask]


def hidden_rms(hidden: torch.Tensor, lengths: torch.Tensor | None = None, clip_norm: float | None = None) -> float:
    """Per-coordinate RMS of h_p over real tokens, after per-token clipping if ``clip_norm`` is set.

    Args:
        hidden: (B, n, d) head outputs.
        lengths: (B,) real tokens per sequence (left padding); ``None`` means no padding.
        clip_norm: clip each token's vector to this L2 norm first.
    """
    rows = real_token_rows(hidden.detach().float(), lengths)  # (N, d)
    if rows.shape[0] == 0:
        raise ValueError("hidden has no real tokens to measure")
    if clip_norm is not None:
        rows = clip_per_token(rows, clip_norm)
    return float(rows.pow(2).mean().sqrt())


def token_norm_quantile(hidden: torch.Tensor, lengths: torch.Tensor | None = None, q: float = 0.5) -> float:
    """The ``q``-quantile of the per-token L2 norms of h_p: a data-driven clip norm.

    Clipping at the median leaves half the tokens untouched; measure it on public text, not
    on the data to be protected (the clip norm must not depend on private data).
    ``hidden``: (B, n, d) left-padded states; ``lengths``: (B,) real tokens (None: no padding).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    norms = real_token_rows(hidden.detach().float(), lengths).norm(dim=-1)  # (N,)
    return float(torch.quantile(norms, q))


def calibrate(
    target: NoiseTarget, hidden: torch.Tensor | None = None, lengths: torch.Tensor | None = None
) -> Calibration:
    """Resolve a ``NoiseTarget`` into a ``NoiseConfig`` and report what it means.

    Args:
        target: what is asked.
        hidden: (B, n, d) head outputs on public text; needed for ``relative_sigma`` and
            used to report the RMS otherwise.
        lengths: (B,) real tokens per sequence of ``hidden`` (left padding).
    """
    rms = hidden_rms(hidden, lengths, target.clip_norm) if hidden is not None else None
    if target.mode == "sigma":
        sigma = float(cast(float, target.sigma))  # mode "sigma": set
    elif target.mode == "relative":
        if rms is None:
            raise ValueError("relative_sigma needs hidden states to measure h_p's RMS on")
        sigma = float(cast(float, target.relative_sigma)) * rms  # mode "relative": set
    else:
        sigma = accountant.sigma_for_epsilon(
            float(cast(float, target.epsilon)),  # mode "dp": set
            target.delta,
            target.releases,
            float(cast(float, target.clip_norm)),  # required with epsilon (checked in __post_init__)
            rows=target.rows,
            conversion=target.conversion,
        )
    noise = NoiseConfig(sigma=sigma, clip_norm=target.clip_norm, seed=target.seed)
    return describe(noise, releases=target.releases, delta=target.delta, rows=target.rows, rms=rms, mode=target.mode)


def describe(
    noise: NoiseConfig,
    releases: int = 1,
    delta: float = 1e-5,
    rows: int = 1,
    rms: float | None = None,
    mode: str = "sigma",
) -> Calibration:
    """What a ``NoiseConfig`` means: the report every run should print.

    Args:
        noise: the noise in use.
        releases: how many times each token's representation is sent.
        delta: delta to report epsilon at.
        rows: rows of h_p one protected unit can change.
        rms: h_p's per-coordinate RMS, if measured.
        mode: how the noise was chosen.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    epsilon: float | None = None
    if noise.clip_norm is not None:
        epsilon = accountant.epsilon_for_sigma(noise.sigma, noise.clip_norm, releases, delta, rows)
    return Calibration(noise=noise, mode=mode, rms=rms, epsilon=epsilon, delta=delta, releases=releases, rows=rows)


def _public_states(
    head: Head, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str] | None, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (B, n, d), lengths (B,)) of ``head`` on the public calibration text (or ``texts``)."""
    from fedsea.privacy.attacks.data import encode_texts, head_states
    from fedsea.privacy.public_text import PUBLIC_TEXT

    ids = encode_texts(tokenizer, PUBLIC_TEXT if texts is None else texts, max_tokens)
    if not ids:
        raise ValueError("the calibration texts give no sequence of >= 2 tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    states = head_states(head, ids, int(pad))
    return states.hidden, states.lengths


def public_rms(
    head: Head,
    tokenizer: PreTrainedTokenizerBase,
    clip_norm: float | None = None,
    texts: Sequence[str] | None = None,
    max_tokens: int = CALIBRATION_TOKENS,
) -> float:
    """Per-coordinate RMS of ``head``'s output on public text (after clipping, if set).

    Args:
        head: the client's head, before any private training (its fresh LoRA adds nothing).
        tokenizer: the model's tokenizer.
        clip_norm: clip each token's vector to this L2 norm first, as the mechanism does.
        texts: public text; default ``fedsea.privacy.public_text.PUBLIC_TEXT``.
        max_tokens: tokens kept per text.
    """
    return hidden_rms(*_public_states(head, tokenizer, texts, max_tokens), clip_norm)


def resolve_noise(
    target: NoiseTarget,
    head: Head,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str] | None = None,
) -> Calibration:
    """A client's noise from what was asked: ``calibrate`` on the head's output on public text.

    The RMS is measured in every mode (cheap: a couple of dozen short sequences through the
    head's p blocks), so that every run can report sigma relative to h_p's scale.
    """
    return calibrate(target, *_public_states(head, tokenizer, texts, CALIBRATION_TOKENS))
