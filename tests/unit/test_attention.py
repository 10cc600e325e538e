"""fedsea's SDPA kernel ranking: flash first on CUDA, scoped to the block, nothing changed on the CPU."""

from __future__ import annotations

import torch

from fedsea.model.attention import KERNEL_PRIORITY, attention_kernels


def _order() -> list[int]:
    return list(torch._C._get_sdp_priority_order())


def test_cuda_forwards_rank_flash_first_and_the_process_default_comes_back():
    before = _order()
    with attention_kernels(torch.device("cuda")):
        inside = _order()
        assert inside[: len(KERNEL_PRIORITY)] == [int(b) for b in KERNEL_PRIORITY]
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert _order() == before


def test_other_devices_keep_the_process_defaults():
    before = _order()
    with attention_kernels(torch.device("cpu")):
        assert _order() == before
