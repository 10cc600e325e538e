"""Attack (a): the paper's learned inversion, a decoder from the whole sequence h~_p to tokens.

The seed paper's attacker trains the model's last blocks + norm + LM head on a colluding
client's (h_A, tokens) pairs. fedsea's decoder is a small *bidirectional* transformer over
the released sequence, ending in the public tied LM head: the server sees the whole
sequence at once, so it may use context on both sides of each token (which the causal
blocks of the model itself could not).
"""

from __future__ import annotations

import torch
from torch import nn

from fedsea.model.masks import padding_mask
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


class _DecoderNet(TokenClassifier):
    def __init__(self, embedding: torch.Tensor, width: int, layers: int, heads: int, max_len: int) -> None:
        super().__init__()
        d = embedding.shape[1]
        self.standardize = Standardize(d)
        self.inp = nn.Linear(d, width)
        self.pos = nn.Embedding(max_len, width)
        block = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, d)
        self.skip = nn.Linear(d, d)
        self.vocab = TiedVocab(embedding)
        self.max_len = max_len

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        real = padding_mask(lengths, n).bool()  # (B, n)
        # Position of each slot within its sequence (left padding: the first real token is 0).
        pos = (torch.arange(n).unsqueeze(0) - (n - lengths).unsqueeze(1)).clamp(0, self.max_len - 1)  # (B, n)
        u = self.standardize(x)  # (B, n, d)
        z = self.inp(u) + self.pos(pos)  # (B, n, w)
        z = self.blocks(z, src_key_padding_mask=~real)  # (B, n, w)
        logits: torch.Tensor = self.vocab(self.out(self.norm(z)) + self.skip(u))  # (B, n, V)
        return logits


class DecoderAttack:
    """Learned sequence inversion: bidirectional transformer + public tied LM head.

    Args:
        embedding: (V, d) the public token embedding matrix.
        config: training settings (``width``, ``layers``, ``heads`` shape the transformer).
        max_len: longest sequence the position table covers.
    """

    name = "decoder"

    def __init__(self, embedding: torch.Tensor, config: TrainConfig | None = None, max_len: int = 512) -> None:
        self.config = config or TrainConfig()
        if self.config.width % self.config.heads != 0:
            raise ValueError(f"width ({self.config.width}) must be divisible by heads ({self.config.heads})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.net = _DecoderNet(embedding, self.config.width, self.config.layers, self.config.heads, max_len)
        self.losses: list[float] = []

    def fit(self, aux: HiddenSet, mechanism: Mechanism) -> None:
        """Train the decoder on states the mechanism releases from the auxiliary set; keep the epoch losses."""
        self.losses = fit_classifier(self.net, self.net.standardize, aux, mechanism, self.config)

    def predict(self, observed: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """observed: (B, n, d) released states, lengths: (B,); returns the recovered token ids (B, n)."""
        return predict_classifier(self.net, observed, lengths)

    def logits(self, observed: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, n, V) logits, for ``OptimizationAttack(prior=...)``."""
        return classifier_logits(self.net, observed, lengths)
