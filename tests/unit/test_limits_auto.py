"""Memory budgets left at 0 ("auto") are sized from the memory free beside the trunk's weights."""

from __future__ import annotations

import os

import pytest

import fedsea
from fedsea.config import ServerLimits
from fedsea.limits import AUTO_SHARES, GIB, MIB
from fedsea.server.memory import free_memory_beside
from fedsea.server.trunk import TrunkHost


def test_auto_budgets_are_their_shares_of_the_free_memory():
    sized = ServerLimits().sized(24 * GIB)
    assert sized.is_sized and not ServerLimits().is_sized
    for name, share in AUTO_SHARES.items():
        assert getattr(sized, name) == int(share * 24 * GIB)
    # The CPU machine's figures stay about what issue 14's fixed defaults were.
    assert 7 * GIB < sized.max_pending_bytes_per_client < 9 * GIB
    assert 0.9 * GIB < sized.max_cache_bytes_per_client < 1.1 * GIB


def test_a_budget_set_explicitly_is_kept_and_the_others_sized():
    limits = ServerLimits(max_pending_bytes_per_client=123 * MIB, max_cache_bytes=7 * MIB)
    sized = limits.sized(80 * GIB)
    assert sized.max_pending_bytes_per_client == 123 * MIB and sized.max_cache_bytes == 7 * MIB
    assert sized.max_pending_bytes == int(80 * GIB * 2 / 3)
    assert sized.max_cache_bytes_per_client == int(80 * GIB / 24)
    assert sized.sized(1 * GIB) == sized  # nothing left to size


def test_a_tiny_free_memory_still_gives_every_budget_at_least_a_mebibyte():
    assert ServerLimits().sized(100).max_cache_bytes_per_client == MIB


@pytest.mark.parametrize("name", sorted(AUTO_SHARES))
def test_a_negative_budget_is_refused_naming_it(name):
    with pytest.raises(ValueError, match=f"{name} must be >= 0 \\(0 = auto\\)"):
        ServerLimits(**{name: -1})


def test_the_trunk_host_sizes_auto_budgets_from_the_machine_and_keeps_explicit_ones():
    model = fedsea.tiny_llama(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512)
    free = free_memory_beside(model)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert free == ram - weights
    host = TrunkHost(model, ServerLimits(max_cache_bytes=5 * MIB))
    assert host.limits.is_sized and host.limits.max_cache_bytes == 5 * MIB
    assert host.limits.max_pending_bytes == int(free * 2 / 3)
    assert host.limits.max_pending_bytes_per_client == int(free / 3)
