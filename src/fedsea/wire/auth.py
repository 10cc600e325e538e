"""Per-client bearer tokens, stored hashed, each with a role.

The tokens file is JSON: ``{"clients": {"alice": "sha256:<hex>", "ops": {"hash": "sha256:<hex>",
"role": "operator"}}}``. A plain hash is a client (the format of files written before roles,
which still load); an entry with a role is ``{"hash", "role"}``. Only hashes are stored; a
token is shown once, when ``fedsea token add`` makes it. Clients send
``authorization: Bearer <token>`` in the call metadata.

Roles: ``client`` (the default) sees only its own sessions and figures; ``operator`` also sees
the server-wide figures of ``GetStats`` (all clients' cache and reserved bytes).
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
CLIENT, OPERATOR = "client", "operator"
ROLES = (CLIENT, OPERATOR)


def hash_token(token: str) -> str:
    """``sha256:<hex>`` digest of a token, as the tokens file stores it."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def _entry(client_id: str, value: object) -> tuple[str, str]:
    """(hash, role) of one entry of a tokens file: ``"sha256:<hex>"`` or ``{"hash": ..., "role": ...}``."""
    if isinstance(value, str):
        value = {"hash": value}
    if not isinstance(value, dict) or set(value) - {"hash", "role"}:
        raise ValueError(f"entry {client_id!r} must be 'sha256:<hex>' or {{'hash': ..., 'role': ...}}")
    digest, role = value.get("hash"), value.get("role", CLIENT)
    if not (isinstance(digest, str) and digest.startswith("sha256:")):
        raise ValueError(f"entry {client_id!r}: the hash must be 'sha256:<hex>'")
    if role not in ROLES:
        raise ValueError(f"entry {client_id!r}: role must be one of {', '.join(ROLES)}, got {role!r}")
    return digest, str(role)


class TokenStore:
    """Client id -> token hash and role. ``authenticate(token)`` returns the client id.

    Args:
        hashes: client id -> ``sha256:<hex>`` hash of its token.
        roles: client id -> role (``client`` or ``operator``); ``client`` where absent.
    """

    def __init__(self, hashes: dict[str, str] | None = None, roles: dict[str, str] | None = None) -> None:
        self._hashes = dict(hashes or {})
        self._roles = {k: v for k, v in (roles or {}).items() if v != CLIENT}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenStore:
        """Read a tokens file (``{"clients": {id: "sha256:<hex>" | {"hash", "role"}}}``); ValueError if malformed."""
        try:
            data = json.loads(Path(path).read_text())
            clients = data["clients"]
            if not isinstance(clients, dict) or not all(isinstance(k, str) for k in clients):
                raise ValueError("'clients' must map client ids to 'sha256:<hex>' hashes")
            entries = {k: _entry(k, v) for k, v in clients.items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read tokens file {path}: {exc}") from exc
        return cls({k: h for k, (h, _) in entries.items()}, {k: r for k, (_, r) in entries.items()})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the token hashes (and roles other than ``client``) atomically to ``path``, owner-only."""
        clients: dict[str, object] = {
            k: {"hash": h, "role": self._roles[k]} if k in self._roles else h for k, h in self._hashes.items()
        }
        atomic_write_text(path, json.dumps({"clients": clients}, indent=2, sort_keys=True) + "\n")
        os.chmod(path, 0o600)

    def add(self, client_id: str, role: str = "client") -> str:
        """Make a new token for ``client_id`` with ``role`` (replacing any old one); return it (shown once)."""
        if not _CLIENT_ID.match(client_id):
            raise ValueError(f"client id must match {_CLIENT_ID.pattern}, got {client_id!r}")
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        token = secrets.token_hex(32)  # hex: never starts with "-", safe on any command line
        self._hashes[client_id] = hash_token(token)
        self._roles.pop(client_id, None)
        if role != CLIENT:
            self._roles[client_id] = role
        return token

    def role(self, client_id: str) -> str:
        """``client_id``'s role: ``operator`` or ``client``."""
        return self._roles.get(client_id, CLIENT)

    def is_operator(self, client_id: str) -> bool:
        """Whether ``client_id`` holds an operator token (sees server-wide figures)."""
        return self.role(client_id) == OPERATOR

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

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._hashes


def bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    """The token in ``authorization: Bearer <token>`` call metadata, if any."""
    for key, value in metadata or ():
        if key.lower() == METADATA_KEY:
            text = value.decode() if isinstance(value, bytes) else value
            if text.startswith("Bearer "):
                return text[len("Bearer ") :].strip()
    return None
