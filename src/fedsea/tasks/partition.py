"""Partitioning a data set across federated clients: IID, label skew, size skew.

- ``iid``: a seeded permutation cut into near-equal parts.
- ``dirichlet``: label skew after Hsu et al. (2019, arXiv 1909.06335): for each label, the
  share of its examples that each client gets is drawn from Dirichlet(alpha, ..., alpha).
  Small alpha (0.1) gives clients dominated by one label; large alpha (100) approaches IID.
  Draws are repeated (up to ``max_tries``) until every client has ``min_size`` examples.
- ``size``: quantity skew: client sizes proportional to a Dirichlet(alpha) draw (each at least
  ``min_size``), examples assigned at random, so label mixes stay close to the global one.

Every scheme is a pure function of its arguments and ``seed`` (a private numpy generator; the
global random state is not touched), and returns a ``Partition`` whose ``table()`` prints
each client's size and label mix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedsea.errors import InvalidInputError

SCHEMES = ("iid", "dirichlet", "size")


@dataclass(frozen=True)
class Partition:
    """Which examples each client holds.

    Attributes:
        clients: per client, the sorted indices of its examples (disjoint, covering all).
        scheme: ``iid``, ``dirichlet`` or ``size``; alpha: the concentration (``None`` for iid).
        seed: the seed it was drawn with.
    """

    clients: tuple[tuple[int, ...], ...]
    scheme: str
    alpha: float | None
    seed: int

    @property
    def sizes(self) -> list[int]:
        """Number of examples per client."""
        return [len(c) for c in self.clients]

    def label_counts(self, labels: Sequence[int], num_labels: int | None = None) -> np.ndarray:
        """(clients, labels) counts of each label on each client."""
        y = np.asarray(labels, dtype=np.int64)
        k = int(num_labels if num_labels is not None else y.max() + 1)
        return np.stack([np.bincount(y[list(c)], minlength=k) for c in self.clients])

    def table(self, labels: Sequence[int] | None = None, label_names: Sequence[str] | None = None) -> str:
        """A plain-text table: client, size, share of all examples, and (given labels) the label mix."""
        total = sum(self.sizes)
        names: list[str] = []
        counts = None
        if labels is not None:
            counts = self.label_counts(labels, len(label_names) if label_names else None)
            names = list(label_names) if label_names else [str(i) for i in range(counts.shape[1])]
        header = ["client", "size", "share", *names]
        body = []
        for k, size in enumerate(self.sizes):
            mix = [f"{int(c)} ({c / max(size, 1):.0%})" for c in counts[k]] if counts is not None else []
            body.append([str(k), str(size), f"{size / max(total, 1):.1%}", *mix])
        mix_total = [f"{int(c)} ({c / max(total, 1):.0%})" for c in counts.sum(0)] if counts is not None else []
        body.append(["all", str(total), "100.0%", *mix_total])
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        title = f"partition: {self.scheme}" + (f", alpha={self.alpha:g}" if self.alpha is not None else "")
        lines = [f"{title}, seed={self.seed}, {len(self.clients)} clients"]
        for row in [header, *body]:
            lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        return "\n".join(lines)


def _check(n: int, num_clients: int, min_size: int) -> None:
    if not isinstance(num_clients, int) or num_clients < 1:
        raise InvalidInputError("num_clients", f"must be an integer >= 1, got {num_clients!r}")
    if min_size < 0:
        raise InvalidInputError("min_size", f"must be >= 0, got {min_size}")
    if n < num_clients * max(min_size, 1):
        raise InvalidInputError(
            "num_clients", f"{n} examples cannot give {num_clients} clients {max(min_size, 1)} each"
        )


def _check_alpha(alpha: float) -> None:
    if not (np.isfinite(alpha) and alpha > 0):
        raise InvalidInputError("alpha", f"must be a finite number > 0, got {alpha!r}")


def _freeze(parts: Sequence[Sequence[int] | np.ndarray]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(sorted(int(i) for i in p)) for p in parts)


def iid_partition(n: int, num_clients: int, seed: int = 0) -> Partition:
    """``n`` examples shuffled and cut into ``num_clients`` parts whose sizes differ by at most one."""
    _check(n, num_clients, 1)
    order = np.random.default_rng(seed).permutation(n)
    return Partition(_freeze(np.array_split(order, num_clients)), "iid", None, seed)


def dirichlet_partition(
    labels: Sequence[int], num_clients: int, alpha: float, seed: int = 0, min_size: int = 1, max_tries: int = 1000
) -> Partition:
    """Label skew: each label's examples are split across clients by a Dirichlet(alpha) draw.

    Args:
        labels: one integer label per example.
        num_clients: number of clients.
        alpha: concentration; smaller is more skewed.
        seed: seed of the draws.
        min_size: each client gets at least this many examples (draws are repeated until so).
        max_tries: give up (``InvalidInputError``) after this many draws.
    """
    y = np.asarray(labels, dtype=np.int64)
    _check(len(y), num_clients, min_size)
    _check_alpha(alpha)
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(y):
            members = np.flatnonzero(y == label)
            rng.shuffle(members)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for k, chunk in enumerate(np.split(members, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return Partition(_freeze(parts), "dirichlet", float(alpha), seed)
    raise InvalidInputError(
        "alpha", f"no draw in {max_tries} gave every client {min_size} examples; raise alpha or lower min_size"
    )


def size_skew_partition(n: int, num_clients: int, alpha: float, seed: int = 0, min_size: int = 1) -> Partition:
    """Quantity skew: client sizes follow a Dirichlet(alpha) draw (at least ``min_size`` each)."""
    _check(n, num_clients, min_size)
    _check_alpha(alpha)
    rng = np.random.default_rng(seed)
    spare = n - num_clients * min_size
    shares = rng.dirichlet(np.full(num_clients, alpha)) * spare
    sizes = np.floor(shares).astype(np.int64)
    # Hand out what flooring left over to the largest remainders (ties by client order).
    for k in np.argsort(-(shares - sizes), kind="stable")[: spare - int(sizes.sum())]:
        sizes[k] += 1
    sizes += min_size
    order = rng.permutation(n)
    return Partition(_freeze(np.split(order, np.cumsum(sizes)[:-1])), "size", float(alpha), seed)


def partition(
    num_or_labels: int | Sequence[int],
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> Partition:
    """Partition a data set across clients (see the module docstring).

    Args:
        num_or_labels: the number of examples, or their integer labels (needed by ``dirichlet``).
        num_clients: number of clients.
        scheme: ``iid``, ``dirichlet`` (label skew) or ``size`` (quantity skew).
        alpha: Dirichlet concentration for ``dirichlet`` and ``size``.
        seed: the same seed and arguments always give the same partition.
        min_size: smallest client (``dirichlet`` and ``size``).
    """
    labels = None if isinstance(num_or_labels, int) else list(num_or_labels)
    n = num_or_labels if isinstance(num_or_labels, int) else len(num_or_labels)
    if scheme == "iid":
        return iid_partition(n, num_clients, seed)
    if scheme == "dirichlet":
        if labels is None:
            raise InvalidInputError("num_or_labels", "the dirichlet scheme needs the examples' labels")
        return dirichlet_partition(labels, num_clients, alpha, seed, min_size)
    if scheme == "size":
        return size_skew_partition(n, num_clients, alpha, seed, min_size)
    raise InvalidInputError("scheme", f"must be one of {', '.join(SCHEMES)}, got {scheme!r}")
