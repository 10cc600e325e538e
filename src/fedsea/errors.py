"""fedsea's exception hierarchy.

Domain code raises these; the network layer (a later issue) maps each class to one
gRPC status code from a single table, so that a status is never picked at a call site.
Each class also derives from the closest built-in exception, so plain Python callers
can catch ``ValueError`` or ``FileNotFoundError`` as they would expect.
"""

from __future__ import annotations

# Longest text of a client's value that an error echoes (``shown``), and longest detail string
# of a refusal status: gRPC sends the detail in a trailer, and a trailer over the peer's
# metadata limit (8 KiB by default) turns the refusal into a transport error.
SHOWN_CHARS = 64
MAX_DETAIL_CHARS = 512


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``value`` as an error message may quote it: its ``repr`` (control characters escaped), cut to ``limit`` chars.

    A longer value keeps its head and says how long it was, e.g. ``'aaaa... (16384 chars)``, so
    a client's 16 KB session id or a million-entry shape never travels back in a status.
    """
    if isinstance(value, (tuple, list)) and len(value) > 8:  # a shape: its first dims
        value = f"({', '.join(str(v) for v in value[:8])}, ...) ({len(value)} dims)"
        return value if len(value) <= limit else value[:limit] + "..."
    text = repr(value)
    if len(text) <= limit:
        return text
    size = (
        f"{len(value)} chars" if isinstance(value, str) else f"{len(value)} bytes" if isinstance(value, bytes) else ""
    )
    return f"{text[:limit]}... ({size or f'{len(text)} chars shown as repr'})"


def cap_detail(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """A status detail no longer than ``limit`` chars, non-printable characters escaped."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else f"{text[: limit - 30]}... ({len(text)} chars in all)"


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


class LimitExceededError(FedseaError):
    """A configured limit (sessions, length, batch, bytes, memory) would be exceeded."""


class SessionNotFoundError(FedseaError, KeyError):
    """No such session for this client (unknown, closed, expired or someone else's)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "session not found"


class AuthenticationError(FedseaError):
    """Missing or wrong credentials."""


class ModelMismatchError(FedseaError, ValueError):
    """Client and server do not hold the same base model."""


class DeviceError(FedseaError, ValueError):
    """A device that does not exist here (no such GPU, or a CPU-only torch build)."""


class ProtocolError(FedseaError):
    """A request that is well formed but out of order (e.g. backward without a forward)."""


class BannedError(FedseaError):
    """A client banned from a federated run (too many refused updates)."""


class PermissionDeniedError(FedseaError):
    """An authenticated caller whose role may not make this request (e.g. a client staging a trunk adapter)."""


class StageNotFoundError(FedseaError, KeyError):
    """No trunk adapter stage under this key (never staged, dropped or expired)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "stage not found"


class IdleTimeoutError(FedseaError):
    """A stream waited longer than the idle timeout for the client's next message."""


# The one table from error class to gRPC status code name (``grpc.StatusCode[name]``); the
# first matching class wins, anything else is INTERNAL. Kept as names so that this module
# does not import grpc.
STATUS_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (AuthenticationError, "UNAUTHENTICATED"),
    (SessionNotFoundError, "NOT_FOUND"),
    (StageNotFoundError, "NOT_FOUND"),
    (LimitExceededError, "RESOURCE_EXHAUSTED"),
    (InvalidInputError, "INVALID_ARGUMENT"),
    (PartitionError, "INVALID_ARGUMENT"),
    (AdapterError, "INVALID_ARGUMENT"),
    (ModelMismatchError, "FAILED_PRECONDITION"),
    (ProtocolError, "FAILED_PRECONDITION"),
    (IdleTimeoutError, "DEADLINE_EXCEEDED"),
    (BannedError, "PERMISSION_DENIED"),
    (PermissionDeniedError, "PERMISSION_DENIED"),
)


def status_code_name(exc: BaseException) -> str:
    """The gRPC status code name (e.g. ``INVALID_ARGUMENT``) for ``exc``; ``INTERNAL`` if unmapped."""
    for cls, name in STATUS_CODES:
        if isinstance(exc, cls):
            return name
    return "INTERNAL"


class RemoteError(FedseaError):
    """The server refused a request; ``code`` is the gRPC status code name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
