"""What a session's requests make the trunk hold, measured or counted before it is made.

- ``SavedBytes``: the bytes of the tensors autograd saves during a forward (its activations,
  held until the backward), measured exactly with ``torch.autograd.graph.saved_tensors_hooks``:
  each saved tensor's storage counted once, the model's own parameters and buffers left out
  (they are held anyway).
- ``check_lora``: a trunk LoRA's rank, target names and bytes checked against the limits
  before anything is allocated (peft would allocate r x (in + out) per targeted layer).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from fedsea.config import LoraSpec
from fedsea.errors import InvalidInputError, LimitExceededError, shown
from fedsea.limits import AUTO_SHARES, GIB, ServerLimits
from fedsea.model.adapters import family_targets
from fedsea.model.split import SplitPart

log = logging.getLogger(__name__)

# Longest target module name accepted (a real one is ~10 characters; error messages echo names).
MAX_TARGET_NAME = 128
# Adapter weights are float32 whatever the model's dtype (``fedsea.model.adapters.add_lora``).
ADAPTER_ITEMSIZE = 4


class SavedBytes:
    """Counts the bytes autograd saves inside ``measure()``, each storage once, ``skip``'s storages left out.

    Args:
        skip: storages (by data pointer) not to count: the model's parameters and buffers.
    """

    def __init__(self, skip: set[int]) -> None:
        self.skip = skip
        self.bytes = 0
        self._seen: set[int] = set()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.skip and ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes += int(storage.nbytes())
        # The hook only counts. What it returns is what the graph keeps: the tensor itself would
        # keep its own ``grad_fn`` (an output saved by the op that made it: exp, sigmoid, SDPA's
        # output...) and so its graph alive in a cycle through C++ that Python's collector cannot
        # see; the activations would never be freed. A detached view (same storage and version
        # counter, no grad_fn) is what autograd's own SavedVariable keeps for an output.
        return tensor.detach()

    @contextmanager
    def measure(self) -> Iterator[SavedBytes]:
        """Count the tensors saved for backward inside the block (on this thread)."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
            yield self


class ActivationMeter:
    """Measures forwards' saved activations, and estimates a forward's before it runs.

    The estimate is the largest bytes per token measured so far on the same trunk blocks
    times the tokens (B x n) of the new forward (0 before the first): with it a forward far
    over the budget is refused before it computes; the exact bytes are checked after.

    Args:
        model: the served model; its parameters and buffers are not activations.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._storages: set[int] | None = None
        self._per_token: dict[tuple[int, int], float] = {}

    def invalidate(self) -> None:
        """Forget the model's storages (adapters were added or deleted)."""
        self._storages = None

    def estimate(self, blocks: tuple[int, int], tokens: int) -> int:
        """Bytes a forward of ``tokens`` tokens through ``blocks`` (start, end) is expected to save."""
        return int(self._per_token.get(blocks, 0.0) * tokens)

    @contextmanager
    def measure(self, blocks: tuple[int, int], tokens: int) -> Iterator[SavedBytes]:
        """Count what a forward of ``tokens`` tokens through ``blocks`` saves (``SavedBytes.bytes``)."""
        if self._storages is None:
            self._storages = model_storages(self.model)
        saved = SavedBytes(self._storages)
        with saved.measure():
            yield saved
        if tokens > 0:
            self._per_token[blocks] = max(self._per_token.get(blocks, 0.0), saved.bytes / tokens)


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def model_storages(model: nn.Module) -> set[int]:
    """Data pointers of the storages of ``model``'s parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return {t.untyped_storage().data_ptr() for t in tensors}


def adapter_bytes(part: SplitPart, spec: LoraSpec) -> int:
    """Bytes of the float32 LoRA A (r, in) and B (out, r) that ``spec`` would add to ``part``'s layers."""
    targets = family_targets(part, spec.target_modules)  # AdapterError (INVALID_ARGUMENT) if one matches nothing
    total = 0
    for name, module in part.named_modules():
        if "lora_" in name or name.endswith("base_layer"):
            continue
        if not any(name == t or name.endswith("." + t) for t in targets):  # peft's rule
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, nn.Linear):
            total += spec.r * (base.in_features + base.out_features) * ADAPTER_ITEMSIZE
    return total


def check_lora(part: SplitPart, spec: LoraSpec, limits: ServerLimits) -> int:
    """Refuse a trunk LoRA over the limits before it is made; return its bytes.

    Raises:
        InvalidInputError: a rank over ``max_lora_rank``, more names than ``max_lora_targets``
            or a name longer than ``MAX_TARGET_NAME`` (INVALID_ARGUMENT).
        LimitExceededError: an adapter over ``max_adapter_bytes`` (RESOURCE_EXHAUSTED).
    """
    if spec.r > limits.max_lora_rank:
        raise InvalidInputError(
            "trunk_lora.r", f"rank {spec.r} exceeds the server's max_lora_rank={limits.max_lora_rank}"
        )
    targets = spec.target_modules
    if len(targets) > limits.max_lora_targets:
        raise InvalidInputError(
            "trunk_lora.target_modules",
            f"{len(targets)} names exceed the server's max_lora_targets={limits.max_lora_targets}",
        )
    if any(len(t) > MAX_TARGET_NAME for t in targets):
        raise InvalidInputError("trunk_lora.target_modules", f"a name longer than {MAX_TARGET_NAME} characters")
    size = adapter_bytes(part, spec)
    if size > limits.max_adapter_bytes:
        raise LimitExceededError(
            f"trunk_lora: an adapter of {size} bytes (r={spec.r}) exceeds the server's "
            f"max_adapter_bytes={limits.max_adapter_bytes}"
        )
    return size


def check_pending(limits: ServerLimits, mine: int, total: int) -> None:
    """Refuse activations (of forwards awaiting their backward) of ``mine`` bytes for a client, ``total`` in all,
    past the budgets (RESOURCE_EXHAUSTED naming the limit)."""
    if mine > limits.max_pending_bytes_per_client:
        raise LimitExceededError(
            f"this client's forwards awaiting their backward would hold {mine} bytes of activations, over "
            f"max_pending_bytes_per_client={limits.max_pending_bytes_per_client}; send their backward first"
        )
    if total > limits.max_pending_bytes:
        raise LimitExceededError(
            f"forwards awaiting their backward would hold {total} bytes of activations on the server, over "
            f"max_pending_bytes={limits.max_pending_bytes}; retry later"
        )


def within_pending(limits: ServerLimits, mine: int, total: int) -> bool:
    """Whether ``check_pending`` would let activations of ``mine`` and ``total`` bytes through."""
    return mine <= limits.max_pending_bytes_per_client and total <= limits.max_pending_bytes


def check_hidden(shape: tuple[int, ...], hidden_size: int, limits: ServerLimits, field_name: str = "hidden") -> None:
    """A (B, n, d) tensor's shape against the model's width and the limits, before its bytes are assembled."""
    if len(shape) != 3:
        raise InvalidInputError(field_name, f"expected shape (batch, tokens, {hidden_size}), got {shown(shape)}")
    batch, tokens, width = shape
    if width != hidden_size:
        raise InvalidInputError(field_name, f"width {width} does not match the model's hidden size {hidden_size}")
    if batch < 1 or tokens < 1:
        raise InvalidInputError(field_name, f"empty tensor of shape {shape}")
    if batch > limits.max_batch:
        raise LimitExceededError(f"{field_name}: batch {batch} exceeds max_batch={limits.max_batch}")
    if tokens > limits.max_seq_len:
        raise LimitExceededError(f"{field_name}: {tokens} tokens exceed max_seq_len={limits.max_seq_len}")


def free_memory_beside(model: nn.Module) -> int:
    """Bytes free for a loaded trunk's activations and KV caches, where its weights are.

    On CUDA: free memory on the trunk's GPUs now, after its weights loaded (``mem_get_info``, so
    a process sharing the GPU is counted out). On the CPU (and MPS, whose memory is the host's):
    the machine's RAM less the weights held there.
    """
    cuda = {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
    if cuda:
        return sum(int(torch.cuda.mem_get_info(index)[0]) for index in sorted(cuda))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(GIB, ram - weights)


def sized_limits(limits: ServerLimits, model: nn.Module) -> ServerLimits:
    """``limits`` with its auto (0) memory budgets sized to the memory free beside ``model``; logged."""
    if limits.is_sized:
        return limits
    free = free_memory_beside(model)
    sized = limits.sized(free)
    budgets = ", ".join(
        f"{name}={getattr(sized, name) / GIB:.1f} GiB" + ("" if getattr(limits, name) else " (auto)")
        for name in AUTO_SHARES
    )
    log.info("memory budgets, %.1f GiB free beside the trunk's weights: %s", free / GIB, budgets)
    return sized
