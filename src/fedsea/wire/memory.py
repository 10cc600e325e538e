"""Keep freed memory in the process: tensors that cross the wire land in fresh buffers.

Every transfer allocates its buffers anew (each chunk's bytes, the message, the assembled
tensor), and glibc returns large freed blocks to the kernel (``munmap``, heap trimming), so the
next transfer page-faults on every 4 KiB page it touches again. On the 2-core test machine that
costs about as much as the copies themselves (BENCHMARKS.md, "A fast wire"). Raising glibc's
mmap and trim thresholds keeps freed memory in the heap for reuse; the price is that the process
keeps its peak heap size, which a trunk server or a training client reaches at its first step
anyway. torch and gRPC offer no hook for this: ``mallopt`` is the only one (glibc's own
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` environment variables do the same when
set before the process starts).

Applied by the ``fedsea`` command (every subcommand) and the benchmarks' server processes; in
Python, call ``keep_freed_memory()`` once. ``FEDSEA_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

ENV = "FEDSEA_KEEP_FREED_MEMORY"
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks below this size come from the heap (a 4 x 512 x 4096 fp32 activation is 32 MiB, an
# 8 x 2048 x 4096 bf16 one 128 MiB).
MMAP_THRESHOLD = 256 << 20
# Free heap memory kept at the top before any is given back to the kernel.
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if applied.

    A no-op (False) off Linux, on a C library without ``mallopt`` (musl), or with
    ``FEDSEA_KEEP_FREED_MEMORY=0``. A threshold glibc refuses as too high is lowered to its
    largest accepted value (32 MiB for the mmap threshold on some versions).
    """
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # A value over the C int range, or one glibc refuses, falls back to 32 MiB (always accepted).
    tries = [v for v in (mmap_threshold, 32 << 20) if v < 2**31]
    applied_mmap = next((v for v in tries if mallopt(_M_MMAP_THRESHOLD, v) == 1), None)
    applied_trim = mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1)) == 1
    logger.debug("mallopt: mmap threshold %s, trim threshold applied: %s", applied_mmap, applied_trim)
    return applied_mmap is not None and applied_trim
