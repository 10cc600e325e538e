"""Shared machinery of the learned attacks (probe and inversion decoder).

Design decisions:
- Outputs are tied to the public token embedding matrix E (V, d): a network maps each
  released vector to a d-vector ``o`` and the logits are ``o @ E^T + b``. This is the
  public LM head of a tied model (SmolLM2) and gives the attacker a prior over all V tokens,
  including those its auxiliary text never showed.
- Inputs are standardised per coordinate with statistics of the *released* auxiliary
  states: h_p has outlier coordinates in the hundreds (SmolLM2), which would otherwise
  dominate.
- Every epoch draws fresh noise on the auxiliary states (the attacker knows the mechanism
  and may sample it as often as it likes).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedsea.privacy.attacks.data import HiddenSet, Mechanism, release


class Attack(Protocol):
    """An attack: fitted on public data through the mechanism, then applied to what was released."""

    name: str

    def fit(self, aux: HiddenSet, mechanism: Mechanism) -> None:
        """Learn from the attacker's own (token ids, clean h_p) pairs and its copy of the mechanism."""
        ...

    def predict(self, observed: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Recover token ids (B, n) from released states (B, n, d) and lengths (B,)."""
        ...


@dataclass(frozen=True)
class TrainConfig:
    """Training of a learned attack.

    Args:
        epochs (`int`, defaults to 20): passes over the auxiliary set.
        batch_size (`int`, defaults to 32): sequences per step.
        lr (`float`, defaults to 3e-3): AdamW learning rate (cosine decay to 0).
        weight_decay (`float`, defaults to 0.01): AdamW weight decay.
        width (`int`, defaults to 512): hidden width of the network.
        layers (`int`, defaults to 2): hidden layers (probe) or transformer blocks (decoder).
        heads (`int`, defaults to 4): attention heads (decoder only).
        max_seconds (`float | None`): stop training after this wall time.
        seed (`int`, defaults to 0): seed of initialisation, order and noise.
    """

    epochs: int = 20
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    width: int = 512
    layers: int = 2
    heads: int = 4
    max_seconds: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "width", "layers", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0 or None, got {self.max_seconds!r}")


class TiedVocab(nn.Module):
    """Logits over the public vocabulary: ``o @ E^T + b`` with E the frozen token embedding.

    Args:
        embedding: (V, d) the public embedding matrix (shared, never trained).
    """

    def __init__(self, embedding: torch.Tensor) -> None:
        super().__init__()
        # The attack runs on the CPU, with the released states (a no-op for a CPU fp32 model).
        self.embedding: torch.Tensor  # (V, d), a registered buffer
        self.register_buffer("embedding", embedding.detach().to("cpu", torch.float32), persistent=False)
        self.bias = nn.Parameter(torch.zeros(embedding.shape[0]))

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        """out (..., d) -> logits (..., V)."""
        return out.to(self.embedding.dtype) @ self.embedding.T + self.bias


class Standardize(nn.Module):
    """Per-coordinate standardisation with fixed statistics (set by ``fit``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mean: torch.Tensor  # (d,), a registered buffer
        self.std: torch.Tensor  # (d,), a registered buffer
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, rows: torch.Tensor) -> None:
        """rows: (N, d) released auxiliary token vectors."""
        self.mean.copy_(rows.mean(dim=0))
        self.std.copy_(rows.std(dim=0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d) -> (x - mean) / std, same shape."""
        return (x - self.mean) / self.std


class TokenClassifier(nn.Module):
    """Base of the learned attacks: released states (B, n, d) and lengths -> logits (B, n, V)."""

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x: (B, n, d) released states, lengths: (B,) -> logits (B, n, V); subclasses implement it."""
        raise NotImplementedError


def fit_classifier(
    net: TokenClassifier, standardize: Standardize, aux: HiddenSet, mechanism: Mechanism, config: TrainConfig
) -> list[float]:
    """Train ``net`` to predict the auxiliary tokens from freshly released auxiliary states.

    Returns:
        the mean training loss of each epoch.
    """
    gen = torch.Generator().manual_seed(config.seed)
    mask = aux.mask  # (B, n)
    standardize.fit(release(aux, mechanism)[mask])
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * math.ceil(len(aux) / config.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total_steps, 1.0))))
    start, losses = time.monotonic(), []
    net.train()
    for _ in range(config.epochs):
        epoch_loss, batches = 0.0, 0
        for idx in aux.batches(config.batch_size, gen):
            with torch.no_grad():
                x = mechanism(aux.hidden[idx])  # (b, n, d) fresh noise
            logits = net(x, aux.lengths[idx])  # (b, n, V)
            m = mask[idx]
            loss = F.cross_entropy(logits[m], aux.input_ids[idx][m])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            epoch_loss, batches = epoch_loss + float(loss.detach()), batches + 1
        losses.append(epoch_loss / max(batches, 1))
        if config.max_seconds is not None and time.monotonic() - start > config.max_seconds:
            break
    net.eval()
    return losses


@torch.no_grad()
def classifier_logits(
    net: TokenClassifier, observed: torch.Tensor, lengths: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """Logits over the vocabulary at each slot: (B, n, V)."""
    net.eval()
    chunks = torch.arange(observed.shape[0]).split(batch_size)
    return torch.cat([net(observed[idx].float(), lengths[idx]) for idx in chunks])


@torch.no_grad()
def predict_classifier(
    net: TokenClassifier, observed: torch.Tensor, lengths: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """Most likely token at each slot: (B, n) int64."""
    net.eval()
    chunks = torch.arange(observed.shape[0]).split(batch_size)
    return torch.cat([net(observed[idx].float(), lengths[idx]).argmax(dim=-1) for idx in chunks])
