"""Where a model runs and in which dtype: device and dtype specs, checked, resolved and applied.

Specs are data (run files, flags): a device is ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``;
a dtype is ``auto``, ``float32``/``fp32``, ``bfloat16``/``bf16`` or ``float16``/``fp16``.

- ``auto`` device: the first visible GPU (``cuda:0``) when torch sees one, else the CPU. On the
  trunk server (``spread=True``) it means every visible GPU: with more than one, the model's
  decoder blocks are spread over them (``place_blocks``), so a trunk larger than one GPU runs.
- ``auto`` dtype: bfloat16 on CUDA, float32 elsewhere (CPU and MPS).
- float16 on the CPU is allowed (torch computes it, slowly and with fp16's narrow range) but
  logged as a warning: bfloat16 is the CPU's half-precision dtype.
- A device that does not exist is a ``DeviceError`` naming what is visible and how to fix it.

Multi-GPU placement keeps the model's code unchanged: each block gets a forward pre-hook that
moves its tensor inputs (hidden states, mask, position ids, rotary cos/sin) to the block's
device, so a loop over the blocks (``SplitPart._run_blocks``) crosses devices as it goes, and
autograd carries the gradients back. A block's KV cache is created on its own device by the
block itself (the cache follows the key/value tensors).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from fedsea.config import DEVICE_SPECS, check_device_spec, check_dtype_spec
from fedsea.errors import DeviceError

logger = logging.getLogger(__name__)

__all__ = [
    "DEVICE_SPECS",
    "DTYPE_NAMES",
    "DeviceError",
    "balanced_plan",
    "cast_and_place",
    "check_device_spec",
    "check_dtype_spec",
    "describe_placement",
    "place_blocks",
    "place_model",
    "resolve_device",
    "resolve_dtype",
    "resolve_wire_dtype",
    "visible_gpus",
]

# Dtype names: each torch dtype under its long and short name.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# The wire's name of each torch dtype (``fedsea.config.WIRE_DTYPES``).
_WIRE_NAME: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_CPU_BUILD_FIX = (
    "this torch is a CPU-only build; install a CUDA build of torch (https://pytorch.org/get-started/locally/) "
    "or use --device cpu"
)


def _cuda_count() -> int:
    """Visible CUDA devices (0 on a CPU-only build). A function so tests can pretend."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str | torch.device, spread: bool = False) -> torch.device | Literal["auto"]:
    """The device a spec names, checked against the hardware.

    Args:
        spec: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (or a ``torch.device``).
        spread: the caller can spread a model over several GPUs (the trunk server): ``auto``
            with more than one visible GPU then returns ``"auto"``, meaning "all of them".

    Raises:
        DeviceError: the device does not exist here (the message says what does and the fix).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = check_device_spec(spec).strip().lower()
    count = _cuda_count()
    if text == "auto":
        if count > 1 and spread:
            return "auto"
        return torch.device("cuda", 0) if count else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise DeviceError("device 'mps' is not available here (Apple-silicon GPUs only); use --device cpu")
        return torch.device("mps")
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:  # a CPU-only build
        raise DeviceError(f"device {spec!r} needs CUDA, but {_CPU_BUILD_FIX}")
    if count == 0:
        raise DeviceError(
            f"device {spec!r}: torch sees no CUDA GPU (driver missing, or CUDA_VISIBLE_DEVICES empty); use --device cpu"
        )
    index = int(text.split(":", 1)[1]) if ":" in text else 0
    if index >= count:
        visible = ", ".join(f"cuda:{i}" for i in range(count))
        raise DeviceError(f"device {spec!r} does not exist: {count} GPU(s) visible ({visible}); pick one of those")
    return torch.device("cuda", index)


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype a spec names; ``auto`` (or None): bfloat16 on CUDA, float32 elsewhere.

    ``device`` may be ``"auto"`` (spread over GPUs: CUDA). float16 on the CPU is allowed with a
    warning (slow, and fp16's range overflows where bfloat16's does not).
    """
    if isinstance(spec, torch.dtype):
        dtype = spec
    else:
        text = check_dtype_spec(spec if spec is not None else "auto").strip().lower()
        kind = "cuda" if device == "auto" else torch.device(device).type
        if text == "auto":
            return torch.bfloat16 if kind == "cuda" else torch.float32
        dtype = DTYPE_NAMES[text]
    if dtype not in _WIRE_NAME:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if dtype == torch.float16 and device != "auto" and torch.device(device).type == "cpu":
        logger.warning("float16 on the CPU is slow and overflows more easily; bfloat16 is the CPU's half precision")
    return dtype


def resolve_wire_dtype(spec: str | None, model_dtype: torch.dtype) -> str:
    """The wire dtype name (fp32, bf16, fp16): ``spec``, or for ``auto``/None the model's dtype's."""
    if spec is None or spec == "auto":
        return _WIRE_NAME.get(model_dtype, "fp32")
    return spec


# -- multi-GPU placement -----------------------------------------------------------------------------


def balanced_plan(block_bytes: Sequence[int], devices: int, first_bytes: int = 0) -> list[int]:
    """The device of each block: contiguous ranges with about equal bytes per device.

    Args:
        block_bytes: each block's parameter bytes, in order.
        devices: how many devices to fill (>= 1).
        first_bytes: bytes already on device 0 (embedding, final norm, LM head).

    Returns:
        A non-decreasing device index per block; every device gets a block when there are
        at least as many blocks as devices.
    """
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    count = len(block_bytes)
    if count == 0:
        return []
    total = first_bytes + sum(block_bytes)
    plan: list[int] = []
    device, filled = 0, first_bytes
    for i, size in enumerate(block_bytes):
        left_blocks, left_devices = count - i, devices - device
        # Move on when this device has its share (its midpoint passed), or when the blocks left
        # are just enough to give every later device one.
        share = total * (device + 1) / devices
        must_move = left_blocks < left_devices
        wants_move = filled + size / 2 > share and device + 1 < devices
        if device + 1 < devices and plan and (must_move or wants_move):
            device += 1
        plan.append(device)
        filled += size
    return plan


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU; a CUDA tensor through pinned memory (the caching host allocator).

    A pageable ``.cpu()`` copy runs at a fraction of the bus speed; a pinned staging copy, then
    a wait on the stream, is what ``fedsea.wire.tensors`` does for the wire too. A CPU tensor is
    returned as it is.
    """
    if tensor.device.type != "cuda":
        return tensor.cpu()
    staging = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    staging.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return staging


def _move(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (also inside tuples, lists, dicts) on ``device``."""
    if isinstance(value, torch.Tensor):
        # non_blocking only towards a GPU: a GPU -> CPU copy could be read before it lands.
        return value.to(device, non_blocking=device.type == "cuda") if value.device != device else value
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value  # caches and other objects follow the tensors they receive


def _align_inputs(device: torch.device) -> Any:
    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        return _move(args, device), _move(kwargs, device)

    return hook


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _to_device(module: nn.Module, device: torch.device) -> None:
    """Move ``module`` to ``device``; a module on the meta device is allocated there instead (empty).

    A ``random:`` model is spread while still on the meta device, so that each block's weights
    are first allocated on its own GPU (no host copy of the whole model); they are filled after.
    """
    tensors = [*module.parameters(), *module.buffers()]
    if any(t.is_meta for t in tensors):
        module.to_empty(device=device)
    else:
        module.to(device)


def visible_gpus() -> list[torch.device]:
    """``cuda:0`` ... ``cuda:{N-1}``: every GPU torch sees (none on a CPU-only build)."""
    return [torch.device("cuda", i) for i in range(_cuda_count())]


def place_blocks(model: nn.Module, devices: Sequence[torch.device]) -> list[torch.device]:
    """Spread a LLaMA-family model's decoder blocks over ``devices`` (contiguous, balanced by bytes).

    The embedding, rotary embedding, final norm and LM head go to ``devices[0]`` (hidden states
    enter the trunk there); each block moves to its device and gets a pre-hook that brings its
    inputs along. Returns each block's device. With one device this is a plain ``.to``.
    """
    base = model.get_submodule("model")  # LlamaForCausalLM.model: checked by check_supported
    layers = list(base.get_submodule("layers").children())
    first = devices[0]
    others = [m for name, m in model.named_children() if name != "model"]
    others += [m for name, m in base.named_children() if name != "layers"]
    first_bytes = sum(_param_bytes(m) for m in others)
    plan = balanced_plan([_param_bytes(layer) for layer in layers], len(devices), first_bytes)
    for module in others:
        _to_device(module, first)
    placed = []
    for layer, index in zip(layers, plan, strict=True):
        device = devices[index]
        _to_device(layer, device)
        if len(devices) > 1:
            layer.register_forward_pre_hook(_align_inputs(device), with_kwargs=True)
        placed.append(device)
    model.fedsea_block_devices = placed  # type: ignore[assignment]  # plain attribute, for reports and tests
    return placed


def place_model(model: nn.Module, device: torch.device | Literal["auto"]) -> nn.Module:
    """Put ``model`` on ``device``, or with ``"auto"`` spread its blocks over every visible GPU."""
    if device == "auto":
        if getattr(model, "fedsea_block_devices", None):  # spread as it was built (a random: model)
            return model
        gpus = visible_gpus()
        placed = place_blocks(model, gpus)
        spans = ", ".join(f"{d}: {sum(1 for p in placed if p == d)} blocks" for d in gpus)
        logger.warning("spread %d blocks over %d GPUs (%s)", len(placed), len(gpus), spans)
        return model
    return model.to(device)


def _lossy(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether casting ``source`` weights to ``target`` can change their values."""
    return source != target and target != torch.float32


def cast_and_place(model: nn.Module, dtype: torch.dtype, device: torch.device | Literal["auto"]) -> nn.Module:
    """Cast ``model`` to ``dtype``, put it on ``device`` (``"auto"``: spread over the GPUs), in eval mode.

    A cast that rounds the weights (to bfloat16 or float16) first records the model's fingerprint
    of the weights as loaded, so that a bfloat16 server and a float32 client of one checkpoint
    still agree that they hold the same base model.
    """
    from fedsea.model.fingerprint import model_fingerprint

    loaded = next(model.parameters()).dtype
    if _lossy(loaded, dtype):
        model_fingerprint(model)  # type: ignore[arg-type]
    # Parameters only, as a Hugging Face load in ``dtype`` does: float buffers (RoPE's inv_freq)
    # stay float32, or positions would be rounded in a bfloat16 model. Replacing ``.data`` keeps
    # tied weights tied (one Parameter object).
    for param in model.parameters():
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    return place_model(model, device).eval()


def describe_placement(model: nn.Module) -> str:
    """Where ``model`` is, in one line: ``cpu, torch.float32`` or ``blocks 0-15 on cuda:0, 16-31 on cuda:1, ...``."""
    first = next(model.parameters())
    placed: list[torch.device] | None = getattr(model, "fedsea_block_devices", None)
    if not placed or len(set(placed)) < 2:
        return f"{first.device}, {first.dtype}"
    spans: list[str] = []
    start = 0
    for i in range(1, len(placed) + 1):
        if i == len(placed) or placed[i] != placed[start]:
            spans.append(f"{start}-{i - 1} on {placed[start]}")
            start = i
    return f"blocks {', '.join(spans)}, {first.dtype}"
