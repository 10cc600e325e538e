"""Where models and their caches live: the cache folder and what a source string resolved to.

Its own module so that ``fedsea.model.fingerprint`` can read both without importing the loader
(which fingerprints what it loads).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ResolvedSource", "cache_dir"]


def cache_dir() -> Path:
    """fedsea's cache folder: ``$FEDSEA_CACHE``, else ``$XDG_CACHE_HOME/fedsea``, else ``~/.cache/fedsea``."""
    if os.environ.get("FEDSEA_CACHE"):
        return Path(os.environ["FEDSEA_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "fedsea"


@dataclass(frozen=True)
class ResolvedSource:
    """What a model source string names. ``kind`` is 'tiny', 'random', 'folder', 'gguf' or 'hub'.

    ``location`` is the canonical ``random:`` source for 'random' (options in a fixed order).
    """

    kind: str
    location: str
