"""Noise shaped to the directions that identify tokens, at the power of isotropic noise.

Isotropic noise of standard deviation sigma spends most of its power on directions that
carry little token identity. ``ShapedPrivatizer`` draws ``n = sigma * L z`` with z ~ N(0, I_d)
and

    L = U diag(s) U^T + s_out (I - U U^T),        U: (d, k) orthonormal columns

normalised so that ``trace(L L^T) = d``: the expected noise power per token,
``E ||n||^2 = sigma^2 d``, equals that of isotropic noise with the same sigma; only its
distribution over directions changes. U is chosen on public data: the principal
directions of h_p's per-token means on public text (``token_basis``: where token identity
lives), of the token embedding matrix (``embedding_basis``), or of h_p itself (``hidden_shape``).

Shaping costs the worst-case guarantee: the (epsilon, delta) of a shaped mechanism is set
by its smallest standard deviation (``ShapedPrivatizer.min_std``), which is below sigma.
It is an empirical defence, measured by the attack suite, not a DP one.
"""

from __future__ import annotations

import math

import torch

from fedsea.config import NoiseConfig
from fedsea.privacy.calibration import real_token_rows
from fedsea.privacy.noise import Privatizer, clip_per_token


class NoiseShape:
    """The shape of the noise: an orthonormal basis, the std along it and outside it.

    The scales are normalised at construction so that ``sum(s^2) + (d - k) s_out^2 = d``
    (total power of unit isotropic noise).

    Args:
        basis: (d, k) with orthonormal columns, 1 <= k <= d.
        in_scale: (k,) relative standard deviation along each basis direction.
        out_scale: relative standard deviation in the orthogonal complement (ignored if k = d).
    """

    def __init__(self, basis: torch.Tensor, in_scale: torch.Tensor, out_scale: float) -> None:
        if basis.dim() != 2 or not 1 <= basis.shape[1] <= basis.shape[0]:
            raise ValueError(f"basis must have shape (d, k) with 1 <= k <= d, got {tuple(basis.shape)}")
        basis = basis.detach().to(torch.float32)
        eye = torch.eye(basis.shape[1])
        if not torch.allclose(basis.T @ basis, eye, atol=1e-4):
            raise ValueError("basis must have orthonormal columns")
        in_scale = torch.as_tensor(in_scale, dtype=torch.float32).detach()
        if (
            in_scale.shape != (basis.shape[1],)
            or bool((in_scale < 0).any())
            or not bool(torch.isfinite(in_scale).all())
        ):
            raise ValueError(f"in_scale must be ({basis.shape[1]},) finite and >= 0, got {tuple(in_scale.shape)}")
        if not (math.isfinite(out_scale) and out_scale >= 0):
            raise ValueError(f"out_scale must be a finite number >= 0, got {out_scale!r}")
        d, k = basis.shape
        out_scale = out_scale if k < d else 0.0
        power = float(in_scale.pow(2).sum()) + (d - k) * out_scale**2
        if power <= 0:
            raise ValueError("in_scale and out_scale are all zero: the shape has no power")
        norm = math.sqrt(d / power)
        self.basis = basis  # (d, k)
        self.in_scale = in_scale * norm  # (k,)
        self.out_scale = out_scale * norm

    @property
    def dim(self) -> int:
        """d, the dimension of the states the noise is added to."""
        return int(self.basis.shape[0])

    @property
    def rank(self) -> int:
        """k, the number of basis directions with their own scale."""
        return int(self.basis.shape[1])

    @property
    def min_scale(self) -> float:
        """Smallest relative std over all directions (sets the worst-case DP guarantee)."""
        smallest = float(self.in_scale.min())
        return min(smallest, self.out_scale) if self.rank < self.dim else smallest

    @property
    def subspace_fraction(self) -> float:
        """Share of the expected noise power inside span(basis)."""
        return float(self.in_scale.pow(2).sum()) / self.dim

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """Map unit isotropic noise z (..., d) to shaped noise L z (..., d)."""
        basis = self.basis.to(z.device)
        coords = z @ basis  # (..., k)
        inside = (coords * self.in_scale.to(z.device)) @ basis.T  # (..., d)
        outside = (z - coords @ basis.T) * self.out_scale  # (..., d)
        return inside + outside


def pca_basis(vectors: torch.Tensor, k: int, center: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k principal directions of a set of vectors.

    Args:
        vectors: (N, d).
        k: number of directions, 1 <= k <= min(N, d).
        center: subtract the mean first.

    Returns:
        (basis (d, k) orthonormal, std (k,) of the vectors along each direction).
    """
    if vectors.dim() != 2:
        raise ValueError(f"vectors must have shape (N, d), got {tuple(vectors.shape)}")
    n, d = vectors.shape
    if not 1 <= k <= min(n, d):
        raise ValueError(f"k must be in [1, min(N, d)] = [1, {min(n, d)}], got {k}")
    x = vectors.detach().to(torch.float64)
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)  # vh: (min(N, d), d)
    basis = vh[:k].T.contiguous()  # (d, k)
    std = s[:k] / math.sqrt(max(n - 1, 1))  # (k,)
    return basis.to(torch.float32), std.to(torch.float32)


def embedding_basis(embedding: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k principal directions of the token embedding matrix (V, d): (d, k)."""
    return pca_basis(embedding, k)[0]


def subspace_shape(basis: torch.Tensor, fraction: float) -> NoiseShape:
    """A ``fraction`` of the noise power spread evenly inside span(basis), the rest outside.

    ``fraction = k / d`` is isotropic noise; ``fraction = 1`` puts all of it in the subspace.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    d, k = basis.shape
    if k == d and fraction < 1.0:
        raise ValueError("fraction must be 1 when the basis spans the whole space")
    inside = math.sqrt(fraction * d / k)
    outside = math.sqrt((1 - fraction) * d / (d - k)) if k < d else 0.0
    return NoiseShape(basis, torch.full((k,), inside), outside)


def hidden_shape(hidden: torch.Tensor, lengths: torch.Tensor | None, k: int, fraction: float) -> NoiseShape:
    """Noise shaped to h_p's own top-k principal directions, std proportional to h_p's along them.

    Args:
        hidden: (B, n, d) head outputs on public text.
        lengths: (B,) real tokens (left padding); ``None`` for none.
        k: number of directions.
        fraction: share of the noise power inside them.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    basis, std = pca_basis(real_token_rows(hidden.detach().float(), lengths), k)
    d = basis.shape[0]
    in_scale = std * math.sqrt(fraction * d / float(std.pow(2).sum().clamp_min(1e-30)))
    outside = math.sqrt((1 - fraction) * d / (d - k)) if k < d else 0.0
    return NoiseShape(basis, in_scale, outside)


def token_basis(hidden: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor | None, k: int) -> torch.Tensor:
    """Directions along which h_p's per-token means differ most (between-token scatter): (d, k).

    The mean of h_p over each token id's occurrences is what a per-token attacker learns to
    recognise; the top principal directions of these means (weighted by occurrences) are
    where token identity lives. Measure on public text.

    Args:
        hidden: (B, n, d) head outputs on public text.
        input_ids: (B, n) their token ids.
        lengths: (B,) real tokens (left padding); ``None`` for none.
        k: number of directions.
    """
    rows = real_token_rows(hidden.detach().float(), lengths)  # (N, d)
    ids = real_token_rows(input_ids.unsqueeze(-1), lengths).squeeze(-1)  # (N,)
    uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    means = torch.zeros(len(uniq), rows.shape[1]).index_add_(0, inverse, rows) / counts.unsqueeze(1)  # (U, d)
    centered = (means - rows.mean(dim=0)) * counts.unsqueeze(1).float().sqrt()  # weight by occurrences
    return pca_basis(centered, k, center=False)[0]


class ShapedPrivatizer(Privatizer):
    """``Privatizer`` with shaped noise: clip, then add ``sigma * L z``; same interface and retries.

    Args:
        config: sigma (the isotropic-equivalent std: same expected power), clip norm and seed.
        shape: the shape of the noise.
        device: device of the generator.
        keep: how many recent payloads to keep for ``resend``.
    """

    def __init__(
        self, config: NoiseConfig, shape: NoiseShape, device: str | torch.device = "cpu", keep: int = 4
    ) -> None:
        super().__init__(config, device=device, keep=keep)
        self.shape = shape

    @property
    def min_std(self) -> float:
        """The smallest per-direction standard deviation: the sigma a DP accountant must use."""
        return self.config.sigma * self.shape.min_scale

    def _apply(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-1] != self.shape.dim:
            raise ValueError(f"hidden's last dim {hidden.shape[-1]} != the shape's d = {self.shape.dim}")
        out = hidden
        if self.config.clip_norm is not None:
            out = clip_per_token(out, self.config.clip_norm)
        if self.config.sigma > 0:
            z = torch.randn(out.shape, generator=self.generator, dtype=torch.float32, device=out.device)
            out = out + (self.shape.apply(z) * self.config.sigma).to(out.dtype)
        return out
