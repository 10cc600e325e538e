"""Adapter states <-> Flower records, and the slices of the global adapter each party gets.

Global adapter keys name the block: ``layers.N.<module>.lora_A.weight`` and so on (the native
coordinator's convention), so a party's slice is a filter on N.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

__all__ = [
    "arrays_of",
    "block_of",
    "config_of",
    "head_tail_slice",
    "metrics_of",
    "scalar",
    "to_record",
    "to_state",
]


def block_of(key: str) -> int:
    """The block number N of a global adapter key ``layers.N....``."""
    return int(key.split(".")[1])


def head_tail_slice(
    state: Mapping[str, torch.Tensor], num_layers: int, head: int, tail: int
) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` in the first ``head`` and last ``tail`` of ``num_layers`` blocks."""
    return {k: v for k, v in state.items() if block_of(k) < head or block_of(k) >= num_layers - tail}


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` of a state dict (CPU float32 copies: what FedAvg averages in numpy)."""
    return ArrayRecord({k: v.detach().to("cpu", torch.float32) for k, v in state.items()})


def to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The state dict of an ``ArrayRecord`` (CPU tensors)."""
    return dict(record.to_torch_state_dict())


def arrays_of(message: Message, key: str = "arrays") -> ArrayRecord:
    """The message's ``ArrayRecord`` named ``key``."""
    return message.content.array_records[key]


def config_of(message: Message, key: str = "config") -> ConfigRecord:
    """The message's ``ConfigRecord`` named ``key``."""
    return message.content.config_records[key]


def metrics_of(message: Message, key: str = "metrics") -> MetricRecord:
    """The message's ``MetricRecord`` named ``key``."""
    return message.content.metric_records[key]


def scalar(record: Mapping[str, Any], key: str) -> int | float | str | bool:
    """A scalar value of a config or metric record; a clear error if missing or not a scalar."""
    if key not in record:
        raise ValueError(f"the message's record lacks {key!r}")
    value = record[key]
    if not isinstance(value, (int, float, str, bool)):
        raise ValueError(f"{key!r} in the message's record is not a scalar: {type(value).__name__}")
    return value
