"""The tensor codec: exact round trips, chunking, and every malformed-chunk error."""

from __future__ import annotations

import pytest
import torch

from fedsea.errors import InvalidInputError, LimitExceededError
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.shaper import NetShaper
from fedsea.wire.tensors import TensorAssembler, decode, encode, wire_dtype


@pytest.mark.parametrize(
    ("name", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_round_trip_is_exact_in_the_wire_dtype(name, dtype):
    t = torch.randn(3, 5, 7)
    chunks = list(encode(t, wire_dtype(name), chunk_bytes=50))
    assert len(chunks) > 1 and all(len(c.data) <= 50 for c in chunks)
    back = decode(chunks, "hidden", 1 << 20)
    assert back.dtype == dtype and torch.equal(back, t.to(dtype))


def test_empty_tensor_is_one_chunk():
    chunks = list(encode(torch.empty(0, 4), pb.FLOAT32))
    assert len(chunks) == 1 and decode(chunks, "x", 10).shape == (0, 4)


def _chunk(**kw):
    base = {"dtype": pb.FLOAT32, "shape": [2, 2], "offset": 0, "data": bytes(16), "total_bytes": 16}
    return pb.TensorChunk(**{**base, **kw})


@pytest.mark.parametrize(
    ("chunks", "match"),
    [
        ([_chunk(dtype=0)], "unknown dtype"),
        ([_chunk(dtype=9)], "unknown dtype"),
        ([_chunk(total_bytes=12, data=bytes(12))], "does not match dtype"),
        ([_chunk(data=bytes(12))], "received 12 of 16"),
        ([_chunk(data=bytes(20))], "more bytes than total_bytes"),
        ([_chunk(offset=4)], "offset 4, expected 0"),
        ([_chunk(data=bytes(8)), _chunk(offset=8, data=bytes(8), shape=[4])], "disagree"),
        ([_chunk(shape=[-2, -2], total_bytes=16)], "negative dimension"),
        ([], "missing"),
    ],
)
def test_malformed_chunks_name_the_field(chunks, match):
    with pytest.raises(InvalidInputError, match=match) as info:
        decode(chunks, "hidden", 1 << 20)
    assert info.value.field == "hidden"


def test_size_and_dtype_limits():
    with pytest.raises(LimitExceededError, match="exceeds the limit of 8 bytes"):
        TensorAssembler("grad", 8).add(_chunk())
    with pytest.raises(InvalidInputError, match="session's wire dtype bf16"):
        TensorAssembler("grad", 64, expect_dtype=pb.BFLOAT16).add(_chunk())
    with pytest.raises(ValueError, match="wire dtype must be one of"):
        wire_dtype("int8")


def test_shaper_arithmetic():
    shaper = NetShaper(latency_ms=20, mbps=100)
    assert shaper.delay_s(0) == pytest.approx(0.020)
    assert shaper.delay_s(1_250_000) == pytest.approx(0.020 + 0.1)  # 10 Mbit at 100 Mbit/s
    assert not NetShaper().active and NetShaper().delay_s(10**9) == 0
    with pytest.raises(ValueError, match="latency_ms"):
        NetShaper(latency_ms=-1)
