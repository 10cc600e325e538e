"""The tensor codec as it was before issue 13 (``git show 3c4063c:src/fedsea/wire/tensors.py``, verbatim).

Kept only so that ``fedsea bench wire`` can time the old path side by side with the new one
(``legacy_mb_s``). Not used by fedsea itself.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar, cast

import torch

from fedsea.config import WIRE_DTYPES as WIRE_DTYPE_NAMES
from fedsea.errors import InvalidInputError, LimitExceededError
from fedsea.wire import fedsea_pb2 as pb

# The names are fedsea.config's (what a setting may say), in the same order as the enums.
WIRE_DTYPES: dict[str, pb.DType] = dict(zip(WIRE_DTYPE_NAMES, (pb.FLOAT32, pb.BFLOAT16, pb.FLOAT16), strict=True))
_TORCH: dict[int, torch.dtype] = {pb.FLOAT32: torch.float32, pb.BFLOAT16: torch.bfloat16, pb.FLOAT16: torch.float16}
_FROM_TORCH = {v: k for k, v in _TORCH.items()}
ITEMSIZE: dict[int, int] = {pb.FLOAT32: 4, pb.BFLOAT16: 2, pb.FLOAT16: 2}
# 3 MiB of tensor bytes per message leaves room for framing under gRPC's default 4 MiB.
DEFAULT_CHUNK_BYTES = 3 * 1024 * 1024
M = TypeVar("M")


def wire_dtype(name: str) -> pb.DType:
    """The proto enum of a wire dtype name (fp32, bf16, fp16)."""
    try:
        return WIRE_DTYPES[name]
    except KeyError:
        raise ValueError(f"wire dtype must be one of {', '.join(WIRE_DTYPES)}, got {name!r}") from None


def dtype_name(value: int) -> str:
    """The wire dtype name (fp32, bf16, fp16) of a proto enum value; ``unknown(<n>)`` otherwise."""
    for name, enum in WIRE_DTYPES.items():
        if enum == value:
            return name
    return f"unknown({value})"


def tensor_bytes(tensor: torch.Tensor, dtype: int) -> bytes:
    """The elements of ``tensor`` (any shape) in ``dtype``, row-major, little-endian."""
    t = tensor.detach().to(device="cpu", dtype=_TORCH[dtype]).contiguous()
    return t.view(torch.uint8).numpy().tobytes()  # (numel * itemsize,)


def encode(tensor: torch.Tensor, dtype: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Split ``tensor`` into chunks of at most ``chunk_bytes`` bytes (at least one chunk).

    Any shape: each chunk carries the shape and dtype, so the receiver can check and rebuild it.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    data = tensor_bytes(tensor, dtype)
    shape = list(tensor.shape)
    total = len(data)
    offset = 0
    while True:
        piece = data[offset : offset + chunk_bytes]
        # The enum is an int at run time; the stub types the field as pb.DType.
        yield pb.TensorChunk(dtype=cast("pb.DType", dtype), shape=shape, offset=offset, data=piece, total_bytes=total)
        offset += len(piece)
        if offset >= total:
            return


@dataclass
class TensorAssembler:
    """Rebuilds one tensor from its chunks, checking each against the first.

    Args:
        field: name used in error messages (e.g. ``"hidden"``).
        max_bytes: refuse a tensor whose declared size exceeds this (RESOURCE_EXHAUSTED).
        expect_dtype: if set, the only dtype accepted (the session's wire dtype).
    """

    field: str
    max_bytes: int
    expect_dtype: int | None = None
    _dtype: int | None = None
    _shape: tuple[int, ...] | None = None
    _total: int = 0
    _buffer: bytearray | None = None
    _received: int = 0

    def add(self, chunk: pb.TensorChunk) -> None:
        """Check one chunk against the first and copy its bytes in at its offset."""
        if self._buffer is None:
            self._start(chunk)
        elif chunk.dtype != self._dtype or tuple(chunk.shape) != self._shape or chunk.total_bytes != self._total:
            raise InvalidInputError(self.field, "chunks disagree on dtype, shape or total_bytes")
        assert self._buffer is not None
        if chunk.offset != self._received:
            raise InvalidInputError(self.field, f"chunk at offset {chunk.offset}, expected {self._received}")
        if self._received + len(chunk.data) > self._total:
            raise InvalidInputError(self.field, f"more bytes than total_bytes={self._total}")
        self._buffer[self._received : self._received + len(chunk.data)] = chunk.data
        self._received += len(chunk.data)

    def _start(self, chunk: pb.TensorChunk) -> None:
        if chunk.dtype not in ITEMSIZE:
            raise InvalidInputError(self.field, f"unknown dtype {chunk.dtype} (expected fp32, bf16 or fp16)")
        if self.expect_dtype is not None and chunk.dtype != self.expect_dtype:
            raise InvalidInputError(
                self.field,
                f"dtype {dtype_name(chunk.dtype)} does not match the session's wire dtype "
                f"{dtype_name(self.expect_dtype)}",
            )
        shape = tuple(int(s) for s in chunk.shape)
        if any(s < 0 for s in shape):
            raise InvalidInputError(self.field, f"negative dimension in shape {shape}")
        expected = math.prod(shape) * ITEMSIZE[chunk.dtype]
        if chunk.total_bytes != expected:
            raise InvalidInputError(
                self.field,
                f"total_bytes={chunk.total_bytes} does not match dtype {dtype_name(chunk.dtype)} x shape {shape} "
                f"= {expected} bytes",
            )
        if expected > self.max_bytes:
            raise LimitExceededError(f"{self.field}: {expected} bytes exceeds the limit of {self.max_bytes} bytes")
        self._dtype, self._shape, self._total = chunk.dtype, shape, expected
        self._buffer = bytearray(expected)

    @property
    def started(self) -> bool:
        """True once the first chunk has arrived."""
        return self._buffer is not None

    @property
    def complete(self) -> bool:
        """All declared bytes have arrived."""
        return self._buffer is not None and self._received == self._total

    def tensor(self) -> torch.Tensor:
        """The assembled tensor, of the declared shape and wire dtype; raises if chunks are missing."""
        if self._buffer is None or self._shape is None or self._dtype is None:
            raise InvalidInputError(self.field, "missing")
        if self._received != self._total:
            raise InvalidInputError(self.field, f"received {self._received} of {self._total} bytes")
        if self._total == 0:
            return torch.empty(self._shape, dtype=_TORCH[self._dtype])
        flat = torch.frombuffer(self._buffer, dtype=torch.uint8)
        return flat.view(_TORCH[self._dtype]).reshape(self._shape)


def decode(
    chunks: Iterable[pb.TensorChunk], field: str, max_bytes: int, expect_dtype: int | None = None
) -> torch.Tensor:
    """Assemble a tensor (of the shape the chunks declare) from an iterable of chunks."""
    assembler = TensorAssembler(field, max_bytes, expect_dtype)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.tensor()


async def receive_tensor(
    requests: AsyncIterable[M], field: str, max_bytes: int, on_first: Callable[[M, pb.TensorChunk], int]
) -> tuple[M, torch.Tensor, int, int]:
    """A chunked request stream's tensor: (first message, tensor, wire dtype, bytes received).

    ``on_first`` sees the first message and its chunk before any bytes are assembled (the
    session's NOT_FOUND, a shape over the limits) and returns the only dtype accepted.
    """
    first: M | None = None
    assembler: TensorAssembler | None = None
    received = 0
    dtype = 0
    async for message in requests:
        received += message.ByteSize()  # type: ignore[attr-defined]
        chunk: pb.TensorChunk = getattr(message, field)
        if first is None or assembler is None:
            first = message
            dtype = on_first(message, chunk)
            assembler = TensorAssembler(field, max_bytes, dtype)
        assembler.add(chunk)
    if first is None or assembler is None:
        raise InvalidInputError("request", "empty request stream")
    return first, assembler.tensor(), dtype, received


def torch_dtype(dtype: int) -> torch.dtype:
    """The torch dtype of a wire dtype enum value."""
    return _TORCH[dtype]


def wire_enum(dtype: torch.dtype) -> int:
    """The wire dtype enum value of a torch dtype (float32, bfloat16, float16)."""
    return _FROM_TORCH[dtype]
