"""Which scaled-dot-product-attention kernel fedsea's parts ask for on a GPU.

On Hopper GPUs PyTorch may pick cuDNN's attention kernel, which builds an execution plan for
every new input shape. A decode step's key length grows by one token per step, so every step
of a generation is a new shape: measured on an H100 (issue 13, BENCHMARKS.md), 43% of the trunk
server's decode time was spent inside SDPA on a first request, and Hugging Face ``generate``'s
first request took 2.4x its second. Flash attention (unmasked batches, one-token decode steps
included) and the memory-efficient kernel (padded batches, with a mask) need no per-shape setup,
so fedsea ranks them first; cuDNN and the math kernel stay as fallbacks for what they cannot do
(float32 runs the memory-efficient or math kernel, as it would anyway).

The ranking is scoped to fedsea's own forwards (``SplitPart._run_blocks``, ``central_forward``)
and left alone on other devices: a library user's process keeps its own defaults elsewhere.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# Flash, then memory-efficient (masks), then cuDNN, then math: every backend stays allowed.
KERNEL_PRIORITY: list[SDPBackend] = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.MATH,
]


def attention_kernels(device: torch.device) -> AbstractContextManager[object]:
    """A context in which SDPA on ``device`` tries ``KERNEL_PRIORITY`` in order (CUDA only; else a no-op)."""
    if device.type != "cuda":
        return nullcontext()
    return sdpa_kernel(KERNEL_PRIORITY, set_priority=True)
