"""Stage keys of trunk staging (``fedsea.server.staging``): checked the same way by both ends."""

from __future__ import annotations

import re

from fedsea.errors import InvalidInputError, shown

# A stage key: chosen by the operator (e.g. "run-abc/round-3"); echoed in errors and logs.
STAGE_KEY = re.compile(r"^[A-Za-z0-9._/-]{1,128}$")


def check_stage_key(key: str) -> str:
    """``key`` if it is 1 to 128 characters of ``[A-Za-z0-9._/-]``; else ``InvalidInputError("key", ...)``."""
    if not STAGE_KEY.fullmatch(key):
        raise InvalidInputError("key", f"a stage key is 1 to 128 chars of [A-Za-z0-9._/-], got {shown(key)}")
    return key
