"""Optional lossy wire compression: one byte per element and one float32 scale per row.

A row is the last dimension (for hidden states (B, n, d): one token's d values). Each row is
scaled by its own absolute maximum, so one large token does not cost the others precision:

* ``int8``: code = round(x / s) in [-127, 127], s = absmax / 127. Dequantized in float32,
  every element is within ``s / 2 = absmax / 254`` of the original (rounding to the nearest
  code), up to float32 rounding of the multiply (a few ulp).
* ``fp8`` (float8 e4m3fn): code = fp8(x / s), s = absmax / 448 (the format's largest finite
  value). Three mantissa bits: the error is at most ``|x| / 16`` for normal codes and
  ``s * 2**-10`` (half the subnormal spacing) near zero.

The receiver's cast to the wire dtype (bf16, fp16) adds that type's own rounding on top.
Half the bytes of bf16, a quarter of fp32; the quantizing costs CPU time, so it pays only on
links slower than the CPU (see BENCHMARKS.md, "A fast wire").
"""

from __future__ import annotations

import math

import torch

from fedsea.errors import InvalidInputError
from fedsea.wire import fedsea_pb2 as pb

# Setting names -> TensorChunk.Compression values ("none" is the default: exact, uncompressed).
COMPRESSIONS: dict[str, int] = {"none": pb.TensorChunk.NONE, "int8": pb.TensorChunk.INT8_ROWS}
if hasattr(torch, "float8_e4m3fn"):
    COMPRESSIONS["fp8"] = pb.TensorChunk.FP8_E4M3_ROWS
_CODE_DTYPE: dict[int, torch.dtype] = {pb.TensorChunk.INT8_ROWS: torch.int8}
_CODE_MAX: dict[int, float] = {pb.TensorChunk.INT8_ROWS: 127.0, pb.TensorChunk.FP8_E4M3_ROWS: 448.0}
if "fp8" in COMPRESSIONS:
    _CODE_DTYPE[pb.TensorChunk.FP8_E4M3_ROWS] = torch.float8_e4m3fn


def compression(name: str) -> int:
    """The ``TensorChunk.Compression`` value of a setting name (none, int8, fp8)."""
    try:
        return COMPRESSIONS[name]
    except KeyError:
        raise ValueError(f"wire compression must be one of {', '.join(COMPRESSIONS)}, got {name!r}") from None


def compression_name(kind: int) -> str:
    """The setting name (none, int8, fp8) of a ``TensorChunk.Compression`` value; ``unknown(<n>)`` otherwise."""
    for name, value in COMPRESSIONS.items():
        if value == kind:
            return name
    return f"unknown({kind})"


def check_session(field: str, kind: int, session_kind: int) -> None:
    """Refuse a chunk compressed other than as its session agreed; exact (NONE) chunks always pass.

    A peer that did not ask for compression must never be handed a lossy tensor it did not expect.
    """
    if kind not in (pb.TensorChunk.NONE, session_kind):
        raise InvalidInputError(
            field,
            f"compression {compression_name(kind)} is not this session's ({compression_name(session_kind)})",
        )


def num_rows(shape: tuple[int, ...]) -> int:
    """Rows of a tensor of ``shape``: the product of all dimensions but the last (1 for a scalar)."""
    return math.prod(shape[:-1]) if shape else 1


# Rows are (de)quantized in blocks of about this many elements: the float32 temporaries stay
# small (no 4-bytes-per-element copy of a whole tensor) and are reused, warm, block after block.
BLOCK_ELEMENTS = 1 << 20


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    shape = tuple(tensor.shape)
    return tensor.reshape(num_rows(shape), shape[-1] if shape else 1)  # (rows, d)


def _step(rows: torch.Tensor) -> int:
    return max(1, BLOCK_ELEMENTS // max(rows.shape[1], 1))  # rows per block


def quantize(tensor: torch.Tensor, kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales): codes of ``tensor``'s shape, one byte each; scales (rows,) float32.

    Computed on the tensor's device (a GPU quantizes before the copy to the host).
    """
    if kind not in _CODE_DTYPE:
        raise ValueError(f"no such compression: {kind}")
    rows = _rows(tensor.detach())  # (rows, d)
    absmax = torch.linalg.vector_norm(rows, ord=math.inf, dim=1, keepdim=True).float()  # (rows, 1)
    scales = absmax / _CODE_MAX[kind]
    # An all-zero row has scale 0: its codes are 0 (not 0/0).
    inverse = torch.where(absmax > 0, _CODE_MAX[kind] / absmax, torch.zeros_like(absmax))
    codes = torch.empty(rows.shape, dtype=_CODE_DTYPE[kind], device=rows.device)
    step = _step(rows)
    for i in range(0, rows.shape[0], step):
        # Out of place: .float() of a float32 tensor is the caller's tensor itself.
        scaled = rows[i : i + step].float() * inverse[i : i + step]  # (step, d), in [-max, max]
        # int8 rounds to the nearest code; the fp8 cast rounds to the nearest representable value.
        codes[i : i + step] = scaled.round_() if kind == pb.TensorChunk.INT8_ROWS else scaled
    return codes.reshape(tensor.shape), scales.reshape(-1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """code * scale of its row, in ``dtype``: codes (..., d), scales (rows,) float32."""
    rows = _rows(codes)  # (rows, d)
    out = torch.empty(rows.shape, dtype=dtype, device=rows.device)
    per_row = scales.reshape(-1, 1)
    step = _step(rows)
    for i in range(0, rows.shape[0], step):
        out[i : i + step] = rows[i : i + step].float().mul_(per_row[i : i + step])  # cast on assignment
    return out.reshape(codes.shape)


def error_bound(tensor: torch.Tensor, kind: int) -> torch.Tensor:
    """The largest |x - dequantize(quantize(x))| each element may show (float32 dequantization)."""
    shape = tuple(tensor.shape)
    rows = tensor.detach().reshape(num_rows(shape), shape[-1] if shape else 1).float()
    absmax = torch.linalg.vector_norm(rows, ord=math.inf, dim=1, keepdim=True)
    scale = absmax / _CODE_MAX[kind]
    bound: torch.Tensor
    if kind == pb.TensorChunk.INT8_ROWS:
        bound = (scale / 2).expand_as(rows)
    else:
        bound = torch.maximum(rows.abs() / 16, scale * 2.0**-10)
    return bound.reshape(shape)


def check_codes(field: str, kind: int, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Refuse what no sender's ``quantize`` makes: a negative or non-finite scale, an fp8 NaN code."""
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise InvalidInputError(field, "scales must be finite and >= 0")
    # e4m3fn has no infinities; its NaNs are the codes 0x7f and 0xff.
    if kind == pb.TensorChunk.FP8_E4M3_ROWS and bool(((codes.view(torch.uint8) & 0x7F) == 0x7F).any()):
        raise InvalidInputError(field, "fp8 codes contain NaN")


def code_dtype(kind: int) -> torch.dtype:
    """The torch dtype of a compression's codes (int8, float8_e4m3fn)."""
    return _CODE_DTYPE[kind]
