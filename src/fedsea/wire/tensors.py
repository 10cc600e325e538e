"""Tensor <-> wire messages: raw little-endian bytes + dtype + shape, chunked.

No pickle: a tensor is rebuilt from its bytes, after the byte count has been checked against
dtype x shape, in a buffer that grows with the bytes that arrive (never allocated from the
declared size, issue 14). Every check failure raises ``InvalidInputError`` naming the field.

Copies (issue 13, ``fedsea bench wire``): a chunk's bytes are copied once out of the tensor's
memory (upb's bytes fields take only ``bytes``) and, with ``encode_into``, straight into the
outer message; the receiver reads each chunk's bytes once and copies them into place. Optional
lossy compression (``fedsea.wire.compress``) is refused unless the receiver allows it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch

from fedsea.config import WIRE_DTYPES as WIRE_DTYPE_NAMES
from fedsea.errors import InvalidInputError, LimitExceededError
from fedsea.wire import compress
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.constants import DEFAULT_CHUNK_BYTES as DEFAULT_CHUNK_BYTES
from fedsea.wire.shapes import check_shape

# The names are fedsea.config's (what a setting may say), in the same order as the enums.
WIRE_DTYPES: dict[str, pb.DType] = dict(zip(WIRE_DTYPE_NAMES, (pb.FLOAT32, pb.BFLOAT16, pb.FLOAT16), strict=True))
_TORCH: dict[int, torch.dtype] = {pb.FLOAT32: torch.float32, pb.BFLOAT16: torch.bfloat16, pb.FLOAT16: torch.float16}
_FROM_TORCH = {v: k for k, v in _TORCH.items()}
ITEMSIZE: dict[int, int] = {pb.FLOAT32: 4, pb.BFLOAT16: 2, pb.FLOAT16: 2}
M = TypeVar("M")
NONE = pb.TensorChunk.NONE  # no compression: the wire dtype's exact bytes


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


def _host_flat(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements, row-major, as a flat CPU uint8 tensor: no copy for a contiguous CPU tensor.

    A CUDA tensor is copied once into pinned host memory (non-blocking, then waited for), which
    is faster than a copy into pageable memory; another device's (mps) with a plain copy.
    """
    if t.device.type == "cuda":
        staging = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        staging.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        t = staging
    elif t.device.type != "cpu":  # mps and others: a plain (blocking) copy
        t = t.cpu()
    # Little-endian: the byte order of every platform torch runs on.
    return t.contiguous().reshape(-1).view(torch.uint8)


def host_bytes(tensor: torch.Tensor, dtype: int) -> torch.Tensor:
    """The elements of ``tensor`` in ``dtype``, row-major, as a flat CPU uint8 tensor (numel * itemsize,).

    No copy when the tensor is already a contiguous CPU tensor of the wire dtype; a GPU tensor
    is converted on its device, then staged through pinned memory.
    """
    return _host_flat(tensor.detach().to(dtype=_TORCH[dtype]))


def tensor_bytes(tensor: torch.Tensor, dtype: int) -> bytes:
    """The elements of ``tensor`` (any shape) in ``dtype``, row-major, little-endian."""
    return host_bytes(tensor, dtype).numpy().tobytes()  # (numel * itemsize,)


def _payload(tensor: torch.Tensor, dtype: int, compression: int) -> tuple[torch.Tensor, bytes]:
    """(flat uint8 payload, scales bytes): the wire dtype's bytes, or compressed codes and their row scales."""
    if compression == NONE:
        return host_bytes(tensor, dtype), b""
    codes, scales = compress.quantize(tensor, compression)  # on the tensor's device
    return _host_flat(codes), scales.to(device="cpu").numpy().tobytes()  # (numel,), (rows * 4,)


def _pieces(flat: torch.Tensor, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of each chunk of ``flat`` (uint8): at least one, each a single copy out of its memory."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    view = flat.numpy().data  # a memoryview, zero-copy: slicing it copies nothing
    total = len(view)
    offset = 0
    while True:
        # protobuf's bytes fields take only ``bytes``: this is the one copy we cannot skip.
        piece = bytes(view[offset : offset + chunk_bytes])
        yield offset, piece
        offset += len(piece)
        if offset >= total:
            return


def _fill(chunk: pb.TensorChunk, dtype: int, shape: list[int], offset: int, piece: bytes, total: int) -> None:
    # The enum is an int at run time; the stub types the field as pb.DType.
    chunk.dtype, chunk.offset, chunk.total_bytes = cast("pb.DType", dtype), offset, total
    chunk.shape.extend(shape)
    chunk.data = piece


def encode(
    tensor: torch.Tensor, dtype: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES, compression: int = NONE
) -> Iterator[pb.TensorChunk]:
    """Split ``tensor`` into chunks of at most ``chunk_bytes`` bytes (at least one chunk).

    Any shape: each chunk carries the shape and dtype, so the receiver can check and rebuild it.
    ``compression`` (``fedsea.wire.compress``; lossy) sends one byte per element instead.
    Chunks are made as they are asked for, straight from the tensor's memory when it is a
    contiguous CPU tensor of the wire dtype: do not modify it in place before the last chunk
    is taken. To send chunks inside another message, prefer ``encode_into``: assigning a
    chunk to a message field copies it again.
    """
    yield from encode_into(tensor, dtype, chunk_bytes, _new_chunk, "", compression)


def _new_chunk(first: bool) -> pb.TensorChunk:
    return pb.TensorChunk()


def encode_into(
    tensor: torch.Tensor,
    dtype: int,
    chunk_bytes: int,
    message: Callable[[bool], M],
    field: str,
    compression: int = NONE,
) -> Iterator[M]:
    """``encode``'s chunks written straight into the ``field`` of messages made by ``message(first)``.

    ``message(True)`` makes the first message (with e.g. the session and step), ``message(False)``
    each later one; ``field=""`` makes the messages the chunks themselves, a dotted ``field``
    (``"step.hidden"``) names a chunk inside a nested message. Filling the chunk in
    place saves a copy of every chunk over ``Outer(field=chunk)``, which copies its bytes.
    """
    shape = list(tensor.shape)
    flat, scales = _payload(tensor, dtype, compression)
    for offset, piece in _pieces(flat, chunk_bytes):
        outer = message(offset == 0)
        chunk: Any = outer
        for name in field.split(".") if field else ():  # a dotted path reaches a nested message
            chunk = getattr(chunk, name)
        _fill(chunk, dtype, shape, offset, piece, len(flat))
        if compression != NONE:
            chunk.compression = cast("pb.TensorChunk.Compression", compression)
            if offset == 0:
                chunk.scales = scales
        yield outer


@dataclass
class TensorAssembler:
    """Rebuilds one tensor from its chunks, checking each against the first.

    Memory follows bytes (issue 14): the declared size is checked against ``max_bytes`` but
    nothing is allocated from it. Chunks are appended to a ``bytearray`` as they arrive
    (``charge`` sees their count first and may refuse them); realloc grows it in place or with
    ``mremap``, over-allocating at most 1/8 of what arrived. The tensor is a zero-copy view of
    it (``torch.frombuffer``), or with ``pin_memory`` one copy in pinned memory. ``release``
    frees the buffer at once (a refused stream).

    Args:
        field: name used in error messages (e.g. ``"hidden"``).
        max_bytes: refuse a tensor whose declared size exceeds this (RESOURCE_EXHAUSTED).
        expect_dtype: if set, the only dtype accepted (the session's wire dtype).
        pin_memory: hand the tensor out in pinned memory (for a fast copy to a GPU).
        allow_compression: accept lossy-compressed chunks (``fedsea.wire.compress``); refused
            by default. Sessions that agreed on a compression (``OpenSessionRequest.wire_compression``)
            allow it and check each tensor's kind themselves (``compress.check_session``).
        charge: told each chunk's byte count before it is kept; raises to refuse it (``fedsea.server.budget``).
    """

    field: str
    max_bytes: int
    expect_dtype: int | None = None
    pin_memory: bool = False
    allow_compression: bool = False
    charge: Callable[[int], None] | None = None
    _dtype: int | None = None
    _shape: tuple[int, ...] | None = None
    _total: int = 0
    _buffer: bytearray | None = None
    _received: int = 0
    _compression: int = NONE
    _scales: bytes = b""
    _released: bool = False
    _pinned: torch.Tensor | None = None  # the pinned copy, once made

    def add(self, chunk: pb.TensorChunk) -> int:
        """Check one chunk against the first and append its bytes; return their count."""
        if self._released:
            if self.charge is not None:
                self.charge(0)  # a budget that freed the buffer says why (its session closed)
            raise InvalidInputError(self.field, "the stream's buffer was released")
        if self._buffer is None:
            self._start(chunk)
        elif (
            chunk.dtype != self._dtype
            or tuple(chunk.shape) != self._shape
            or chunk.total_bytes != self._total
            or chunk.compression != self._compression
        ):
            raise InvalidInputError(self.field, "chunks disagree on dtype, shape, total_bytes or compression")
        elif chunk.scales:
            raise InvalidInputError(self.field, "scales in a chunk other than the first")
        buffer = self._buffer  # a local: ``release`` from another thread cannot pull it from under us
        if chunk.offset != self._received:
            raise InvalidInputError(self.field, f"chunk at offset {chunk.offset}, expected {self._received}")
        data = chunk.data  # each read of a bytes field copies it out of the message: read once
        end = self._received + len(data)
        if end > self._total:
            raise InvalidInputError(self.field, f"more bytes than total_bytes={self._total}")
        if self.charge is not None:
            self.charge(len(data))
        buffer += data  # type: ignore[operator]  # set by _start; grows by what arrived (realloc)
        self._received = end
        return len(data)

    def _start(self, chunk: pb.TensorChunk) -> None:
        if chunk.dtype not in ITEMSIZE:
            raise InvalidInputError(self.field, f"unknown dtype {chunk.dtype} (expected fp32, bf16 or fp16)")
        if self.expect_dtype is not None and chunk.dtype != self.expect_dtype:
            raise InvalidInputError(
                self.field,
                f"dtype {dtype_name(chunk.dtype)} does not match the session's wire dtype "
                f"{dtype_name(self.expect_dtype)}",
            )
        if chunk.compression != NONE and chunk.compression not in compress.COMPRESSIONS.values():
            raise InvalidInputError(self.field, f"unknown compression {chunk.compression}")
        if chunk.compression != NONE and not self.allow_compression:
            raise InvalidInputError(self.field, "compressed chunks are not accepted here")
        check_shape(self.field, chunk.shape)  # <= 8 dims in [0, 2**31), before any size is computed
        shape = tuple(int(s) for s in chunk.shape)
        if any(s < 0 for s in shape):
            raise InvalidInputError(self.field, f"negative dimension in shape {shape}")
        numel = math.prod(shape)
        # A compressed tensor travels as one byte per element but is rebuilt in its dtype.
        expected = numel if chunk.compression != NONE else numel * ITEMSIZE[chunk.dtype]
        if chunk.total_bytes != expected:
            what = "one byte per element" if chunk.compression != NONE else f"dtype {dtype_name(chunk.dtype)}"
            raise InvalidInputError(
                self.field,
                f"total_bytes={chunk.total_bytes} does not match {what} x shape {shape} = {expected} bytes",
            )
        rebuilt = numel * ITEMSIZE[chunk.dtype]
        if rebuilt > self.max_bytes:
            raise LimitExceededError(f"{self.field}: {rebuilt} bytes exceeds the limit of {self.max_bytes} bytes")
        if len(chunk.scales) != (4 * compress.num_rows(shape) if chunk.compression != NONE else 0):
            raise InvalidInputError(self.field, f"{len(chunk.scales)} bytes of scales for shape {shape}")
        self._dtype, self._shape, self._total = chunk.dtype, shape, expected
        self._compression, self._scales = chunk.compression, chunk.scales
        self._buffer = bytearray()  # empty: it grows with the bytes that arrive

    @property
    def complete(self) -> bool:
        """All declared bytes have arrived."""
        return self._buffer is not None and self._received == self._total

    @property
    def held_bytes(self) -> int:
        """Bytes the assembler holds now (what arrived; 0 once released)."""
        if self._pinned is not None:
            return int(self._pinned.numel())
        return len(self._buffer) if self._buffer is not None else 0

    def release(self) -> None:
        """Free the buffer now (a refused or abandoned stream); later chunks are refused."""
        self._released = True
        self._buffer, self._pinned = None, None

    def _flat(self) -> torch.Tensor:
        """The bytes as a flat uint8 tensor (total,): a view of the buffer, or its pinned copy."""
        if self._pinned is not None:
            return self._pinned
        buffer = self._buffer or bytearray()
        # frombuffer refuses an empty buffer; a tensor with a zero dimension has no bytes.
        flat = torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)
        if self.pin_memory:
            pinned = torch.empty(len(buffer), dtype=torch.uint8, pin_memory=True)
            pinned.copy_(flat)
            self._pinned, self._buffer = pinned, bytearray()  # the pageable bytes go now
            return pinned
        return flat

    def tensor(self) -> torch.Tensor:
        """The assembled tensor, of the declared shape and wire dtype; raises if chunks are missing."""
        if self._buffer is None or self._shape is None or self._dtype is None:
            raise InvalidInputError(self.field, "missing")
        if self._received != self._total:
            raise InvalidInputError(self.field, f"received {self._received} of {self._total} bytes")
        flat = self._flat()
        if self._compression == NONE:
            return flat.view(_TORCH[self._dtype]).reshape(self._shape)
        codes = flat.view(compress.code_dtype(self._compression)).reshape(self._shape)
        scales = torch.frombuffer(bytearray(self._scales), dtype=torch.float32) if self._scales else torch.empty(0)
        compress.check_codes(self.field, self._compression, codes, scales)
        return compress.dequantize(codes, scales, _TORCH[self._dtype])


def decode(
    chunks: Iterable[pb.TensorChunk],
    field: str,
    max_bytes: int,
    expect_dtype: int | None = None,
    allow_compression: bool = False,
) -> torch.Tensor:
    """Assemble a tensor (of the shape the chunks declare) from an iterable of chunks."""
    assembler = TensorAssembler(field, max_bytes, expect_dtype, allow_compression=allow_compression)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.tensor()


def torch_dtype(dtype: int) -> torch.dtype:
    """The torch dtype of a wire dtype enum value."""
    return _TORCH[dtype]


def wire_enum(dtype: torch.dtype) -> int:
    """The wire dtype enum value of a torch dtype (float32, bfloat16, float16)."""
    return _FROM_TORCH[dtype]
