"""Per-client bearer tokens, stored hashed.

The tokens file is JSON: ``{"clients": {"alice": "sha256:<hex>", ...}}``. Only hashes are
stored; a token is shown once, when ``fedsea token add`` makes it. Clients send
``authorization: Bearer <token>`` in the call metadata.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from pathlib import Path

from fedsea.errors import AuthenticationError
from fedsea.io import atomic_write_text

METADATA_KEY = "authorization"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def hash_token(token: str) -> str:
    """``sha256:<hex>`` digest of a token, as the tokens file stores it."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """Client id -> token hash. ``authenticate(token)`` returns the client id."""

    def __init__(self, hashes: dict[str, str] | None = None) -> None:
        self._hashes = dict(hashes or {})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenStore:
        """Read a tokens file (``{"clients": {id: "sha256:<hex>"}}``); ``ValueError`` if malformed."""
        try:
            data = json.loads(Path(path).read_text())
            clients = data["clients"]
            if not isinstance(clients, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v.startswith("sha256:") for k, v in clients.items()
            ):
                raise ValueError("'clients' must map client ids to 'sha256:<hex>' hashes")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read tokens file {path}: {exc}") from exc
        return cls(clients)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the token hashes atomically to ``path``, readable by the owner only."""
        atomic_write_text(path, json.dumps({"clients": self._hashes}, indent=2, sort_keys=True) + "\n")
        os.chmod(path, 0o600)

    def add(self, client_id: str) -> str:
        """Make a new token for ``client_id`` (replacing any old one); return it (shown once)."""
        if not _CLIENT_ID.match(client_id):
            raise ValueError(f"client id must match {_CLIENT_ID.pattern}, got {client_id!r}")
        token = secrets.token_hex(32)  # hex: never starts with "-", safe on any command line
        self._hashes[client_id] = hash_token(token)
        return token

    def authenticate(self, token: str | None) -> str:
        """The client id whose token this is; ``AuthenticationError`` if missing or unknown."""
        if not token:
            raise AuthenticationError("missing token: send 'authorization: Bearer <token>'")
        digest = hash_token(token)
        for client_id, stored in self._hashes.items():
            if hmac.compare_digest(digest, stored):
                return client_id
        raise AuthenticationError("unknown token")

    def __len__(self) -> int:
        return len(self._hashes)


def bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    """The token in ``authorization: Bearer <token>`` call metadata, if any."""
    for key, value in metadata or ():
        if key.lower() == METADATA_KEY:
            text = value.decode() if isinstance(value, bytes) else value
            if text.startswith("Bearer "):
                return text[len("Bearer ") :].strip()
    return None
