"""Lazy re-exports for the packages' ``__init__`` (PEP 562): a name's module is imported on first use.

Why: ``import fedsea`` (and ``fedsea --help``) must not pay for torch, transformers and grpc
before a command needs them. A package lists ``name -> module`` and gets the module-level
``__getattr__`` and ``__dir__`` that import and cache each name when it is first touched.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, names: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` re-exporting ``names`` (public name -> its module).

    A looked-up name is stored in ``namespace`` (the package's globals), so the lookup runs once.
    """

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return __getattr__, __dir__
