"""The run file's ``[model]`` and ``[server]`` tables: the base model, and where each party runs it.

``[model]`` names the base model and the device and dtype of every party; ``[server]`` (the trunk
server), ``[client]`` (every client) and ``[[clients]]`` (one client) override the device and the
dtype where they differ. Specs are checked for form here; against the hardware when the model
loads (``fedsea.model.device``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fedsea.config import Placement, check_device_spec, check_dtype_spec
from fedsea.model.constants import DEFAULT_MODEL

__all__ = ["ModelSettings", "ServerSettings", "check_placement"]


@dataclass(frozen=True)
class ModelSettings:
    """The base model, and where every party runs it (``[server]``, ``[client]`` and ``[[clients]]`` may differ).

    Args:
        source: a model source: a Hugging Face folder or name, a GGUF file, ``smollm2-135m`` (the
            packaged default) or ``random:<shape>`` (seeded random weights of a known shape).
    """

    __doc_sources__ = (Placement,)

    source: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        self.placement()  # Placement checks device and dtype

    def placement(self) -> Placement:
        """The device and dtype as a ``Placement``."""
        return Placement(self.device, self.dtype)

    def placed(self, device: str | None, dtype: str | None) -> ModelSettings:
        """These settings with the device and dtype given (None: keep this one's)."""
        return dataclasses.replace(self, device=device or self.device, dtype=dtype or self.dtype)


@dataclass(frozen=True)
class ServerSettings:
    """The trunk server's device and dtype where they differ from ``[model]``.

    Args:
        device: the server's device (unset: ``[model]``'s); ``auto`` spreads the blocks over every
            visible GPU, so a trunk larger than one GPU runs.
        dtype: the server's dtype (unset: ``[model]``'s); auto is bfloat16 on CUDA, float32 on the CPU.
    """

    device: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        check_placement(self.device, self.dtype)


def check_placement(device: str | None, dtype: str | None) -> None:
    """Check a device and a dtype that may be unset (None: the table above decides)."""
    if device is not None:
        check_device_spec(device)
    if dtype is not None:
        check_dtype_spec(dtype)
