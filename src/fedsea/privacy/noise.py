"""Per-token clipping and Gaussian noise on the head's output: the one privacy boundary.

Everything a client sends up is passed through ``Privatizer`` once, before serialization.
The noised tensor it returns is *the* payload of that step: a retry must resend it rather
than calling the privatizer again, because fresh noise on the same tokens would let the
server average it away (``Privatizer`` keeps the last payloads by step key for that).
Every privatizer a client uses is made by ``make_privatizer``, which owns the seeding rules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections import OrderedDict
from collections.abc import Hashable
from typing import Literal, overload

import torch

from fedsea.config import NoiseConfig


def clip_per_token(hidden: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each token's vector (last dim) down to L2 norm <= ``clip_norm``; differentiable.

    Args:
        hidden: (..., d).
    """
    norms = hidden.norm(dim=-1, keepdim=True)  # (..., 1)
    # min(1, c / ||h||); the epsilon keeps all-zero vectors (norm 0) at scale 1 without NaN.
    scale = (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    clipped: torch.Tensor = hidden * scale  # (..., d)
    return clipped


def privatize(hidden: torch.Tensor, config: NoiseConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Return ``clip(hidden) + N(0, sigma^2)``, differentiable with respect to ``hidden``.

    With sigma = 0 and no clip norm, ``hidden`` itself is returned (exactly, no copy).
    """
    out = hidden
    if config.clip_norm is not None:
        out = clip_per_token(out, config.clip_norm)
    if config.sigma > 0:
        noise = torch.randn(out.shape, generator=generator, dtype=torch.float32, device=out.device)
        out = out + (noise * config.sigma).to(out.dtype)
    return out


class Privatizer:
    """Seeded clipping + noise at the client's boundary, with the payloads kept for retries.

    Args:
        config: sigma, clip norm and seed.
        device: device of the generator (that of the tensors to be noised).
        keep: how many recent payloads to keep for ``resend``.
    """

    def __init__(self, config: NoiseConfig, device: str | torch.device = "cpu", keep: int = 4) -> None:
        self.config = config
        seed = config.seed if config.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._keep = keep
        self._sent: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def __call__(self, hidden: torch.Tensor, key: Hashable | None = None) -> torch.Tensor:
        """Noise ``hidden`` (B, n, d); the result stays differentiable w.r.t. ``hidden``.

        If ``key`` is given, the detached payload is kept so that ``resend(key)`` returns the
        very same tensor.
        """
        out = self._apply(hidden)
        if key is not None:
            self._sent[key] = out.detach()
            while len(self._sent) > self._keep:
                self._sent.popitem(last=False)
        return out

    def _apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """Clip and noise ``hidden``; subclasses with other noise (``ShapedPrivatizer``) override this."""
        return privatize(hidden, self.config, self.generator)

    def resend(self, key: Hashable) -> torch.Tensor:
        """The payload first sent under ``key``: identical bytes, no fresh noise."""
        try:
            return self._sent[key]
        except KeyError:
            raise KeyError(f"no payload kept for step {key!r} (only the last {self._keep} are kept)") from None


def derived_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (same parts, same seed, in any process)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


# What a privatizer noises: h_p of a training step, the gradient sent up, or h_p of a generation.
Purpose = Literal["noise", "grad-noise", "inference"]
# Inference seeds step by this prime per generation, away from the training seed.
INFERENCE_SEED_STRIDE = 1_000_003


@overload
def make_privatizer(
    config: NoiseConfig | None,
    device: str | torch.device = ...,
    *,
    purpose: Literal["noise"] = ...,
    secret: str | None = ...,
    context: tuple[object, ...] = ...,
    generation: int = ...,
) -> Privatizer: ...
@overload
def make_privatizer(
    config: NoiseConfig | None,
    device: str | torch.device = ...,
    *,
    purpose: Literal["grad-noise", "inference"],
    secret: str | None = ...,
    context: tuple[object, ...] = ...,
    generation: int = ...,
) -> Privatizer | None: ...
def make_privatizer(
    config: NoiseConfig | None,
    device: str | torch.device = "cpu",
    *,
    purpose: Purpose = "noise",
    secret: str | None = None,
    context: tuple[object, ...] = (),
    generation: int = 0,
) -> Privatizer | None:
    """Every client privatizer (training, gradient, inference, federated rounds), seeded by one rule.

    Which: ``"noise"`` (h_p of training steps) is always built, a pass-through at sigma = 0 that
    still keeps payloads for resends; ``"grad-noise"`` and ``"inference"`` only when ``config``
    clips or noises (else None).

    Seed: with a ``secret`` (a federated client's, never sent), ``derived_seed(secret, *context,
    purpose)``: the server knows the run seed, the client's name and the round (the context),
    so a seed of those alone could be regenerated and the noise subtracted there. Without one,
    ``config.seed``, for inference moved by ``INFERENCE_SEED_STRIDE * (1 + generation)`` so
    that every generation draws fresh noise; ``None`` draws from the OS.
    """
    if purpose != "noise" and (config is None or not config.enabled):
        return None
    config = config or NoiseConfig()
    if secret is not None:
        tail: tuple[object, ...] = (purpose, generation) if purpose == "inference" else (purpose,)
        config = dataclasses.replace(config, seed=derived_seed(secret, *context, *tail))
    elif purpose == "inference" and config.seed is not None:
        config = dataclasses.replace(config, seed=config.seed + INFERENCE_SEED_STRIDE * (1 + generation))
    return Privatizer(config, device=device)
