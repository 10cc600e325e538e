"""Defence (b): a privacy-trained head, an extra loss on the head that removes token identity from h_p.

Two regularizers, both plugged into a split training step the same way::

    h = head(batch.input_ids, batch.lengths)                       # (B, n, d)
    h = regularizer.attach(h, batch.input_ids, batch.lengths, head.embed_tokens)

``attach`` returns a tensor equal to ``h`` (bit for bit) whose backward pass adds the
gradient of ``weight * loss`` to the head's parameters, in the same backward pass as the
task gradient that comes back from the server. With ``weight == 0`` it returns ``h`` itself
and does nothing else: exactly no change.

- ``NoPeekRegularizer``: squared distance correlation between the input token embeddings
  and h_p over the batch's real tokens (NoPeek, Vepakomma et al. 2020).
- ``AdversarialProbeRegularizer``: the client trains its own per-token probe on noised h_p
  (what the server would do), and the head is penalised while the probe does better than
  chance: ``relu(log V - CE(probe(h~_p), tokens))``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedsea.config import NoiseConfig
from fedsea.privacy.calibration import real_token_rows
from fedsea.privacy.constants import HEAD_REGULARIZERS as HEAD_REGULARIZERS
from fedsea.privacy.noise import privatize


class _InjectLoss(torch.autograd.Function):
    """Identity on ``hidden`` whose backward also sends gradient 1 into ``loss``."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_meta = (loss.dtype, loss.device)
        return hidden.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype, device = ctx.loss_meta
        return grad, torch.ones((), dtype=dtype, device=device)


def inject_loss(hidden: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``hidden`` unchanged in value; backpropagating through it also backpropagates ``loss``.

    hidden: any shape (here (B, n, d) h_p); loss: a scalar ().
    """
    out: torch.Tensor = _InjectLoss.apply(hidden, loss)  # type: ignore[no-untyped-call]  # torch leaves apply unannotated
    return out


class HeadRegularizer(Protocol):
    """An extra loss on the head, attached to its output."""

    weight: float

    def attach(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor, embed: nn.Embedding
    ) -> torch.Tensor:
        """Return ``hidden`` (same values) carrying ``weight * loss`` into the backward pass.

        hidden: (B, n, d) h_p; input_ids: (B, n); lengths: (B,) real tokens (left padding).
        """
        ...


def _check_weight(weight: float) -> None:
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (N, N) with a zero (not NaN) gradient on the diagonal."""
    sq = x.pow(2).sum(dim=1)
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * x @ x.T).clamp_min(1e-12)
    return d2.sqrt()


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared sample distance correlation dCor^2(X, Y) in [0, 1] (Székely et al. 2007).

    Args:
        x: (N, p) samples.
        y: (N, q) samples paired with ``x``.
    """
    if x.shape[0] != y.shape[0] or x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"x and y must be (N, p) and (N, q), got {tuple(x.shape)} and {tuple(y.shape)}")

    def centered(z: torch.Tensor) -> torch.Tensor:
        d = _pairwise_distances(z.float())  # (N, N)
        return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()

    a, b = centered(x), centered(y)
    dcov2 = (a * b).mean()
    denom = ((a * a).mean() * (b * b).mean()).sqrt().clamp_min(1e-12)
    return dcov2 / denom


def _sample_rows(rows: int, max_tokens: int, generator: torch.Generator) -> torch.Tensor | None:
    if rows <= max_tokens:
        return None
    return torch.randperm(rows, generator=generator)[:max_tokens]


class NoPeekRegularizer:
    """NoPeek: ``weight * dCor^2(embed(tokens), h_p)`` over (at most ``max_tokens``) real tokens.

    Args:
        weight: multiplier of the loss; 0 disables it exactly.
        max_tokens: subsample the batch's real tokens to this many (the loss is O(N^2)).
        seed: seed of the subsampling.
    """

    def __init__(self, weight: float, max_tokens: int = 512, seed: int = 0) -> None:
        _check_weight(weight)
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        self.weight = weight
        self.max_tokens = max_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.last_loss: float | None = None

    def loss(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor, embed: nn.Embedding
    ) -> torch.Tensor:
        """The unweighted dCor^2 () between the real tokens' input embeddings and their h_p.

        hidden: (B, n, d) h_p; input_ids: (B, n); lengths: (B,) real tokens (left padding).
        """
        h = real_token_rows(hidden, lengths)  # (N, d)
        with torch.no_grad():
            x = real_token_rows(embed(input_ids), lengths)  # (N, d)
        idx = _sample_rows(h.shape[0], self.max_tokens, self.generator)
        if idx is not None:
            h, x = h[idx.to(h.device)], x[idx.to(x.device)]
        return distance_correlation(x, h)

    def attach(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor, embed: nn.Embedding
    ) -> torch.Tensor:
        """hidden: (B, n, d) h_p, input_ids: (B, n), lengths: (B,); returns ``hidden`` carrying the dCor loss."""
        if self.weight == 0:
            return hidden
        loss = self.loss(hidden, input_ids, lengths, embed)
        self.last_loss = float(loss.detach())
        return inject_loss(hidden, self.weight * loss)


class _Probe(nn.Module):
    embedding: torch.Tensor  # (V, d), a registered buffer

    def __init__(self, embedding: torch.Tensor, width: int) -> None:
        super().__init__()
        d = embedding.shape[1]
        self.net = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, width), nn.GELU(), nn.Linear(width, d))
        # float32 like the probe's own weights, whatever the model's dtype (the probe sees h.float()).
        self.register_buffer("embedding", embedding.detach().float(), persistent=False)
        self.bias = nn.Parameter(torch.zeros(embedding.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(x) @ self.embedding.T + self.bias  # (N, V)
        return logits


class AdversarialProbeRegularizer:
    """The client's own adversary: a probe trained on noised h_p, and a head penalised while it wins.

    Each ``attach`` first trains the probe for ``probe_steps`` on the batch's noised (detached)
    states, then adds ``weight * relu(log V - CE(probe(h~_p), tokens))`` with the probe frozen:
    zero once the probe does no better than a uniform guess.

    Args:
        weight: multiplier of the loss; 0 disables it exactly (the probe is not even trained).
        embedding: (V, d) the public token embedding (the probe's tied output).
        noise: the noise the server's states carry (sigma, clip); the probe sees its own draws.
        width: hidden width of the probe.
        lr: the probe's Adam learning rate.
        probe_steps: probe updates per ``attach``.
        max_tokens: subsample the batch's real tokens to this many.
        seed: seed of the probe, the noise draws and the subsampling.
    """

    def __init__(
        self,
        weight: float,
        embedding: torch.Tensor,
        noise: NoiseConfig | None = None,
        width: int = 256,
        lr: float = 1e-3,
        probe_steps: int = 1,
        max_tokens: int = 1024,
        seed: int = 0,
    ) -> None:
        _check_weight(weight)
        if probe_steps < 1 or max_tokens < 1 or width < 1:
            raise ValueError(f"probe_steps, max_tokens, width must be >= 1, got {probe_steps}, {max_tokens}, {width}")
        self.weight = weight
        self.noise = noise or NoiseConfig()
        self.probe_steps = probe_steps
        self.max_tokens = max_tokens
        self.generator = torch.Generator(device=embedding.device).manual_seed(seed)
        self._cpu_gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.probe = _Probe(embedding, width).to(embedding.device)
        self.optimizer = torch.optim.Adam([p for p in self.probe.parameters() if p.requires_grad], lr=lr)
        self.chance = math.log(embedding.shape[0])
        self.last_loss: float | None = None
        self.last_probe_accuracy: float | None = None

    def attach(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor, embed: nn.Embedding
    ) -> torch.Tensor:
        """hidden: (B, n, d) h_p, input_ids: (B, n), lengths: (B,); train the probe, return ``hidden`` with its loss."""
        if self.weight == 0:
            return hidden
        h = real_token_rows(hidden, lengths)  # (N, d)
        tokens = real_token_rows(input_ids.unsqueeze(-1), lengths).squeeze(-1).to(h.device)  # (N,)
        idx = _sample_rows(h.shape[0], self.max_tokens, self._cpu_gen)
        if idx is not None:
            h, tokens = h[idx.to(h.device)], tokens[idx.to(h.device)]
        self.probe.train()
        for _ in range(self.probe_steps):  # the adversary's move, on what the server would see
            with torch.no_grad():
                seen = privatize(h.detach().float(), self.noise, self.generator)
            probe_loss = F.cross_entropy(self.probe(seen), tokens)
            self.optimizer.zero_grad(set_to_none=True)
            probe_loss.backward()
            self.optimizer.step()
        params = list(self.probe.parameters())
        for p in params:  # the head's move: the probe is frozen for it
            p.requires_grad_(False)
        try:
            logits = self.probe(privatize(h.float(), self.noise, self.generator))  # (N, V)
            ce = F.cross_entropy(logits, tokens)
            self.last_probe_accuracy = float((logits.argmax(-1) == tokens).float().mean())
        finally:
            for p in params:
                p.requires_grad_(True)
        loss = F.relu(self.chance - ce)
        self.last_loss = float(loss.detach())
        return inject_loss(hidden, self.weight * loss)


def make_head_regularizer(
    name: str, weight: float, embedding: torch.Tensor, noise: NoiseConfig | None = None, seed: int = 0
) -> HeadRegularizer | None:
    """The head regularizer called ``name`` (``None`` for ``"none"``), as run files and flags name them.

    Args:
        name: one of ``HEAD_REGULARIZERS``.
        weight: its weight (0: no effect at all).
        embedding: (V, d) the public token embedding (the adversarial probe's tied output).
        noise: the release noise the adversarial probe sees (sigma, clip).
        seed: seed of the subsampling (and of the adversarial probe and its noise draws).
    """
    if name == "none":
        return None
    if name == "nopeek":
        return NoPeekRegularizer(weight, seed=seed)
    if name == "adversarial":
        return AdversarialProbeRegularizer(weight, embedding, noise, seed=seed)
    raise ValueError(f"head regularizer must be one of {', '.join(HEAD_REGULARIZERS)}, got {name!r}")
