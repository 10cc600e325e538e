"""The refusal log's rate, the shape check and what an error may echo (issue 14, item 5)."""

from __future__ import annotations

import logging

import pytest

from fedsea.errors import InvalidInputError, cap_detail, shown
from fedsea.server.refusals import RefusalLog
from fedsea.wire.shapes import MAX_DIM, check_shape


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_refusal_log_logs_a_burst_per_kind_then_counts(caplog):
    caplog.set_level(logging.WARNING)
    clock = FakeClock()
    log = RefusalLog(logging.getLogger("test.refusals"), burst=3, window_s=10.0, clock=clock)
    logged = [log.refused("NOT_FOUND", "Forward", "alice", "no session") for _ in range(10)]
    assert logged == [True] * 3 + [False] * 7
    assert log.refused("INVALID_ARGUMENT", "Forward", "alice", "bad")  # another kind
    clock.now = 10.0
    assert log.refused("NOT_FOUND", "Forward", "alice", "no session")  # a new window
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 + 1 + 2
    assert "muted" in lines[2]
    assert lines[4] == "7 more NOT_FOUND refusal(s) of Forward were not logged in the 10 s before"
    assert log.total == 12
    assert not [r for r in caplog.records if r.exc_info]


def test_only_an_internal_fault_logs_a_traceback(caplog):
    log = RefusalLog(logging.getLogger("test.refusals"), burst=2)
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        log.refused("INTERNAL", "Forward", "bob", "internal error: RuntimeError", exc_info=exc)
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None


def test_check_shape_refuses_every_oddity_naming_the_field():
    assert check_shape("x", [2, 3, 4]) == (2, 3, 4)
    assert check_shape("x", []) == ()
    assert check_shape("x", [4, 0, 64]) == (4, 0, 64)  # empty tensors travel (the codec sends them)
    for shape, says in [
        ([2**62, 2**62, 0], "dimension 0"),
        ([2**21, 2**21, 0], "spans more than 1099511627776 elements"),
        ([-1], "negative dimension in shape (-1,)"),
        ([MAX_DIM + 1], f"more than {MAX_DIM}"),
        ([1] * 9, "9 dimensions, more than 8"),
    ]:
        with pytest.raises(InvalidInputError, match=r"^grad: ") as info:
            check_shape("grad", shape)
        assert says in str(info.value)
    with pytest.raises(InvalidInputError) as info:
        check_shape("grad", [5] * 1_000_000)
    assert len(str(info.value)) < 80


def test_shown_bounds_what_an_error_echoes():
    assert shown("abc") == "'abc'"
    long = shown("a" * 16384)
    assert len(long) < 100 and long.endswith("(16384 chars)")
    assert shown("x\n\x00") == "'x\\n\\x00'"
    assert shown(tuple(range(100))) == "(0, 1, 2, 3, 4, 5, 6, 7, ...) (100 dims)"
    assert len(cap_detail("y" * 100_000)) <= 512
    assert cap_detail("a\x00b") == "a\\x00b"
