"""``keep_freed_memory``: glibc's thresholds raised on Linux, and an off switch."""

from __future__ import annotations

import sys

import pytest

from fedsea.wire.memory import ENV, keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_applied_on_linux_and_off_with_the_switch(monkeypatch):
    assert keep_freed_memory() is True
    monkeypatch.setenv(ENV, "0")
    assert keep_freed_memory() is False


def test_a_refused_threshold_falls_back_or_reports_false(monkeypatch):
    # 2**40 bytes is beyond any glibc's limit: the mmap threshold falls back to 32 MiB (accepted).
    monkeypatch.delenv(ENV, raising=False)
    assert keep_freed_memory(mmap_threshold=1 << 40) is sys.platform.startswith("linux")
