"""The OpenAI-compatible endpoint's settings (``fedsea openai``'s flags come from this class).

Light on purpose (no torch, no web framework): the command's ``--help`` reads it.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

# The environment variable that may hold the endpoint's API key (never a command-line argument:
# the process list shows every user of the machine the arguments).
API_KEY_ENV = "FEDSEA_OPENAI_API_KEY"


@dataclass(frozen=True)
class EndpointSettings:
    """Where the endpoint listens and what it accepts.

    Args:
        host (`str`): address to listen on; loopback by default, so that only this machine's
            programs reach it. Another address needs an API key.
        port (`int`): TCP port (0: any free one, printed at start).
        served_model_name (`str`): the model id that ``/v1/models`` lists and requests must name
            (unset: the --model source).
        max_model_len (`int`): longest prompt plus answer, in tokens (unset: the model's
            ``max_position_embeddings`` or the trunk server's ``max_seq_len``, the smaller). A
            request over it is a 400 ``context_length_exceeded``, before anything is sent.
        default_max_tokens (`int`): answer tokens of a chat request that sets no
            ``max_completion_tokens``/``max_tokens`` (at most the room left in the context).
            ``/v1/completions`` defaults to 16, as OpenAI's does.
        max_queue (`int`): requests that may wait while one generates (one split session
            generates one answer at a time); one more is answered 429 at once.
        max_request_bytes (`int`): largest request body; a larger one is answered 413 before
            it is read in full. 4 MiB holds any prompt the context fits.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    max_model_len: int | None = None
    default_max_tokens: int = 512
    max_queue: int = 32
    max_request_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        for name in ("default_max_tokens", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def read_api_key(path: str | os.PathLike[str] | None) -> str | None:
    """The API key: the file ``path`` (stripped), else ``$FEDSEA_OPENAI_API_KEY``, else None (no key).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty key.
    """
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--api-key-file {path}: no such file")
        key = Path(path).read_text(encoding="utf-8").strip()
        where = f"--api-key-file {path}"
    else:
        key = os.environ.get(API_KEY_ENV, "").strip()
        where = f"${API_KEY_ENV}"
        if API_KEY_ENV not in os.environ:
            return None
    if not key:
        raise ValueError(f"{where} is empty: give a key, or none at all for a loopback-only endpoint")
    return key


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond loopback without an API key (anyone on the network could generate)."""
    if api_key is None and not is_loopback(host):
        raise ValueError(
            f"--host {host} is not a loopback address: set an API key first (--api-key-file FILE or "
            f"${API_KEY_ENV}), or keep the default --host 127.0.0.1"
        )


def key_matches(given: str | None, expected: str) -> bool:
    """Compare a presented key with the expected one in constant time."""
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


__all__ = ["API_KEY_ENV", "EndpointSettings", "check_exposure", "is_loopback", "key_matches", "read_api_key"]
