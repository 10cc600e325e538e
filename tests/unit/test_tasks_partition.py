"""Partitions across clients: reproducible, disjoint and covering, and skewed as asked."""

from __future__ import annotations

import numpy as np
import pytest

from fedsea import tasks
from fedsea.errors import InvalidInputError

LABELS = [0] * 500 + [1] * 300 + [2] * 200


def _check_cover(part, n):
    flat = [i for c in part.clients for i in c]
    assert sorted(flat) == list(range(n))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "size"])
def test_reproducible_disjoint_covering(scheme):
    a = tasks.partition(LABELS, 5, scheme=scheme, alpha=0.3, seed=7)
    b = tasks.partition(LABELS, 5, scheme=scheme, alpha=0.3, seed=7)
    c = tasks.partition(LABELS, 5, scheme=scheme, alpha=0.3, seed=8)
    assert a == b and a.clients != c.clients
    _check_cover(a, len(LABELS))
    assert min(a.sizes) >= 1


def test_iid_sizes_and_label_mix_match_the_whole():
    part = tasks.partition(1000, 4, scheme="iid", seed=0)
    assert part.sizes == [250, 250, 250, 250]
    mix = part.label_counts(LABELS) / 250
    assert np.abs(mix - np.array([0.5, 0.3, 0.2])).max() < 0.1


def _skew(part):
    """Mean over clients of the share of their most common label."""
    counts = part.label_counts(LABELS, 3)
    return float((counts.max(1) / counts.sum(1)).mean())


def test_dirichlet_label_skew_grows_as_alpha_shrinks():
    skews = [_skew(tasks.partition(LABELS, 8, "dirichlet", alpha=a, seed=0)) for a in (0.05, 1.0, 1000.0)]
    assert skews[0] > 0.85  # nearly one label per client
    assert skews[0] > skews[1] > skews[2]
    assert skews[2] < 0.6  # the global mix's top label is 0.5


def test_size_skew_varies_sizes_not_labels():
    part = tasks.partition(LABELS, 6, "size", alpha=0.5, seed=3, min_size=10)
    assert min(part.sizes) >= 10 and max(part.sizes) > 3 * min(part.sizes)
    assert sum(part.sizes) == len(LABELS)
    big = [k for k, s in enumerate(part.sizes) if s >= 100]
    counts = part.label_counts(LABELS, 3)
    for k in big:
        assert abs(counts[k, 0] / part.sizes[k] - 0.5) < 0.15


def test_table_shows_sizes_and_label_mix():
    part = tasks.partition(LABELS, 3, "dirichlet", alpha=0.5, seed=1)
    table = part.table(LABELS, ["neg", "pos", "neu"])
    lines = table.splitlines()
    assert lines[0] == "partition: dirichlet, alpha=0.5, seed=1, 3 clients"
    assert lines[1].split() == ["client", "size", "share", "neg", "pos", "neu"]
    assert len(lines) == 2 + 3 + 1 and lines[-1].split()[:3] == ["all", "1000", "100.0%"]
    row0 = lines[2].split()
    assert int(row0[1]) == part.sizes[0]
    assert int(row0[3]) == part.label_counts(LABELS, 3)[0, 0]


def test_invalid_arguments():
    with pytest.raises(InvalidInputError, match="needs the examples' labels"):
        tasks.partition(100, 2, "dirichlet")
    with pytest.raises(InvalidInputError, match="alpha"):
        tasks.partition(LABELS, 2, "dirichlet", alpha=0)
    with pytest.raises(InvalidInputError, match="cannot give 5 clients"):
        tasks.partition(3, 5)
    with pytest.raises(InvalidInputError, match="scheme"):
        tasks.partition(10, 2, "round-robin")
