"""The one check of a tensor shape a peer declares, before anything is sized from it.

A shape arrives as protobuf ``repeated int64``: any count of any int64 values. torch multiplies
the dimensions with an overflow check that fires before a zero is reached, so
``[2**62, 2**62, 0]`` declares an empty tensor that torch cannot even build (the INTERNAL of
issue 14), and a million dimensions make every message that quotes the shape a megabyte long.
``check_shape`` refuses all of these with ``InvalidInputError`` naming the field
(INVALID_ARGUMENT), quoting at most the first dimensions (``fedsea.errors.shown``).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedsea.errors import InvalidInputError, shown

# Most dimensions of a tensor on the wire: fedsea sends (B, n, d) activations and 2-D LoRA
# matrices; 8 leaves room and keeps a quoted shape short.
MAX_DIMS = 8
# Largest single dimension: 2**31 - 1 elements (far beyond any batch, sequence, hidden or
# vocabulary size).
MAX_DIM = 2**31 - 1
# Largest product of the dimensions, zeros counted as 1: an empty tensor is fine (the codec
# sends one), but torch multiplies every dimension with an overflow check before it meets the
# zero. 2**40 elements is far past any byte limit (``max_tensor_bytes``) for a non-empty one.
MAX_ELEMENTS = 2**40


def check_shape(field: str, shape: Sequence[int], max_dims: int = MAX_DIMS) -> tuple[int, ...]:
    """``shape`` as a tuple of ints, or ``InvalidInputError`` naming ``field``.

    Args:
        field: the field in error messages (e.g. ``"hidden"``, ``"adapter[name]"``).
        shape: the declared dimensions (a protobuf repeated field or any sequence of ints).
        max_dims: most dimensions accepted; a scalar (no dimension) is accepted.

    Raises:
        InvalidInputError: more than ``max_dims`` dimensions, a negative dimension, one above
            ``MAX_DIM``, or dimensions whose product (zeros counted as 1) is above ``MAX_ELEMENTS``.
    """
    if len(shape) > max_dims:  # not quoted: the count says it all
        raise InvalidInputError(field, f"shape has {len(shape)} dimensions, more than {max_dims}")
    dims = tuple(int(s) for s in shape)
    if any(s < 0 for s in dims):
        raise InvalidInputError(field, f"negative dimension in shape {shown(dims)}")
    for axis, size in enumerate(dims):
        if size > MAX_DIM:
            raise InvalidInputError(field, f"dimension {axis} of shape {shown(dims)} is {size}, more than {MAX_DIM}")
    product = 1
    for size in dims:
        product *= max(size, 1)
    if product > MAX_ELEMENTS:
        raise InvalidInputError(field, f"shape {shown(dims)} spans more than {MAX_ELEMENTS} elements (zeros as 1)")
    return dims
