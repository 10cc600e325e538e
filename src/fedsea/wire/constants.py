"""Wire defaults the command line shows, without torch or protobuf (``fedsea bench wire --help``).

``fedsea.wire.tensors`` re-exports ``DEFAULT_CHUNK_BYTES``.
"""

from __future__ import annotations

# Tensor bytes per message. 1 MiB beat 3 MiB (the old size) and 256 KiB on loopback in
# ``fedsea bench wire`` (BENCHMARKS.md): every chunk is copied a few times into fresh memory,
# and bigger buffers page-fault more per message; far smaller chunks pay gRPC's per-message
# overhead instead. Well under gRPC's default 4 MiB message limit.
DEFAULT_CHUNK_BYTES = 1024 * 1024

__all__ = ["DEFAULT_CHUNK_BYTES"]
