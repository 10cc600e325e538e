"""A request stream's tensor, assembled as its chunks arrive (the servers' receive path).

Split out of ``fedsea.wire.tensors`` (which encodes and assembles one tensor) to keep both small.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable
from typing import Any, TypeVar

import torch

from fedsea.errors import InvalidInputError
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.tensors import TensorAssembler

M = TypeVar("M")


def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _size_without_data(message: Any, chunk: pb.TensorChunk, data_len: int) -> int:
    """``message.ByteSize()`` as it was before ``chunk.data`` (``data_len`` bytes) was cleared.

    upb's ``ByteSize()`` serializes the whole message (as slow as sending it); without the data
    it is cheap, and the data's share is its field's tag, length varint and bytes.
    """
    rest, inner = message.ByteSize(), chunk.ByteSize()
    if data_len == 0:
        return int(rest)
    full = inner + 1 + _varint_len(data_len) + data_len  # tag of field 4 (data) is one byte
    return int(rest - _varint_len(inner) + _varint_len(full) + full - inner)


async def receive_tensor(
    requests: AsyncIterable[M],
    field: str,
    max_bytes: int,
    on_first: Callable[[M, pb.TensorChunk], int],
    pin_memory: bool = False,
    allow_compression: bool = False,
    charge: Callable[[int], None] | None = None,
    track: Callable[[TensorAssembler], None] | None = None,
) -> tuple[M, torch.Tensor, int, int]:
    """A chunked request stream's tensor: (first message, tensor, wire dtype, bytes received).

    ``on_first`` sees the first message and its chunk before any bytes are assembled (the
    session's NOT_FOUND, a shape over the limits) and returns the only dtype accepted. Each
    message's chunk data is dropped once copied into the tensor (the first message is returned
    without it); bytes received still count it, as serialized. ``charge`` is told each chunk's
    byte count before it is kept, ``track`` sees the assembler (a budget may free it early). On
    any error (a refused chunk, a deadline, a cancelled stream) its buffer is freed at once.
    """
    first: M | None = None
    assembler: TensorAssembler | None = None
    received = 0
    dtype = 0
    try:
        async for message in requests:
            chunk: pb.TensorChunk = getattr(message, field)
            if first is None or assembler is None:
                first = message
                dtype = on_first(message, chunk)
                assembler = TensorAssembler(field, max_bytes, dtype, pin_memory, allow_compression, charge)
                if track is not None:
                    track(assembler)
            count = assembler.add(chunk)
            chunk.ClearField("data")
            received += _size_without_data(message, chunk, count)
        if first is None or assembler is None:
            raise InvalidInputError("request", "empty request stream")
        return first, assembler.tensor(), dtype, received
    except BaseException:
        # Freed now, not when the traceback (which holds this frame) is collected.
        if assembler is not None:
            assembler.release()
        raise
