"""Attack (b): a per-token MLP probe from h~_p to token ids, trained on noised public states.

Each released vector is classified alone (no context), through the public tied vocabulary.
This is the attacker of the issue's reference measurement: on SmolLM2 at p = 1 it recovered
~85% of a victim's tokens at sigma = 0 and ~77% at sigma = 4.
"""

from __future__ import annotations

import torch
from torch import nn

from fedsea.privacy.attacks.data import HiddenSet, Mechanism
from fedsea.privacy.attacks.learned import (
    Standardize,
    TiedVocab,
    TokenClassifier,
    TrainConfig,
    classifier_logits,
    fit_classifier,
    predict_classifier,
)


class _ProbeNet(TokenClassifier):
    def __init__(self, embedding: torch.Tensor, width: int, layers: int) -> None:
        super().__init__()
        d = embedding.shape[1]
        self.standardize = Standardize(d)
        blocks: list[nn.Module] = []
        dim = d
        for _ in range(layers):
            blocks += [nn.Linear(dim, width), nn.GELU()]
            dim = width
        self.mlp = nn.Sequential(*blocks, nn.Linear(dim, d))
        self.skip = nn.Linear(d, d)  # a linear read-out of the token's own embedding direction
        self.vocab = TiedVocab(embedding)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        u = self.standardize(x)  # (B, n, d)
        logits: torch.Tensor = self.vocab(self.mlp(u) + self.skip(u))  # (B, n, V)
        return logits


class ProbeAttack:
    """Per-token MLP probe.

    Args:
        embedding: (V, d) the public token embedding matrix (the tied LM head).
        config: training settings (``width`` and ``layers`` shape the MLP).
    """

    name = "probe"

    def __init__(self, embedding: torch.Tensor, config: TrainConfig | None = None) -> None:
        self.config = config or TrainConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.net = _ProbeNet(embedding, self.config.width, self.config.layers)
        self.losses: list[float] = []

    def fit(self, aux: HiddenSet, mechanism: Mechanism) -> None:
        """Train the probe on states the mechanism releases from the auxiliary set; keep the epoch losses."""
        self.losses = fit_classifier(self.net, self.net.standardize, aux, mechanism, self.config)

    def predict(self, observed: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """observed: (B, n, d) released states, lengths: (B,); returns the probe's token ids (B, n)."""
        return predict_classifier(self.net, observed, lengths)

    def logits(self, observed: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, n, V) logits, for ``OptimizationAttack(prior=...)``."""
        return classifier_logits(self.net, observed, lengths)
