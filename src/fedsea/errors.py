"""fedsea's exception hierarchy.

Domain code raises these; the network layer (a later issue) maps each class to one
gRPC status code from a single table, so that a status is never picked at a call site.
Each class also derives from the closest built-in exception, so plain Python callers
can catch ``ValueError`` or ``FileNotFoundError`` as they would expect.
"""

from __future__ import annotations


class FedseaError(Exception):
    """Base class of every error fedsea raises on purpose."""


class ModelNotFoundError(FedseaError, FileNotFoundError):
    """A model source names no existing file, folder or packaged model."""


class UnsupportedModelError(FedseaError, ValueError):
    """The model's architecture cannot be split by fedsea."""


class ModelLoadError(FedseaError, RuntimeError):
    """A model or tokenizer exists but could not be read or converted."""


class PartitionError(FedseaError, ValueError):
    """Partition points (head_layers, tail_layers) that do not fit the model."""


class InvalidInputError(FedseaError, ValueError):
    """A tensor or argument with the wrong shape, dtype or range; names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class AdapterError(FedseaError, ValueError):
    """An adapter file that does not match the part it is loaded into."""
