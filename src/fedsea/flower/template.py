"""The Flower app folder of a fedsea federation: ``fedsea flower new DIR`` writes it.

A Flower app is a folder whose ``pyproject.toml`` names the ServerApp and ClientApp and holds
the run config's defaults (``[tool.flwr.app.config]``: ``flwr run`` overrides only keys declared
there). fedsea's apps live in the installed package, so the folder only configures them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedsea.federation.simconfig import example_run_file
from fedsea.io import atomic_write_text

DEFAULT_CONFIG: dict[str, Any] = {
    "run-file": "run.toml",
    "set": "",
    "run-dir": "",
    "trunk-address": "",
    "operator-token-file": "",
    "tls-ca": "",
    "strategy": "",
    "resume": False,
    "secure-aggregation": False,
    "report": True,
    "evaluate": "rounds",
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # a TOML basic string, integer or float


def pyproject(config: dict[str, Any], name: str = "fedsea-federation") -> str:
    """The app's ``pyproject.toml`` with ``config`` as the run config's defaults.

    No ``[tool.flwr.federations]``: flwr 1.42 keeps SuperLink connections in its own config
    (``$FLWR_HOME/config.toml``) and sizes a local simulation with ``flwr run ...
    --federation-config "num-supernodes=N"``.
    """
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "{name}"',
        'version = "1.0.0"',
        'description = "A fedsea federation: split fine-tuning on Flower"',
        'license = "MIT"',
        'dependencies = ["fedsea"]',
        "",
        "[tool.hatch.build.targets.wheel]",
        'packages = ["."]',
        "",
        "[tool.flwr.app]",
        'publisher = "fedsea"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedsea.flower.server_app:app"',
        'clientapp = "fedsea.flower.client_app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f'"{k}" = {_toml_value(v)}' for k, v in config.items()),
        "",
    ]
    return "\n".join(lines)


def write_app(folder: str | Path, config: dict[str, Any] | None = None, run_file: bool = True) -> Path:
    """Write a Flower app folder for fedsea: ``pyproject.toml`` and (``run_file``) a commented ``run.toml``."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "pyproject.toml", pyproject({**DEFAULT_CONFIG, **(config or {})}))
    if run_file and not (path / "run.toml").exists():
        atomic_write_text(path / "run.toml", example_run_file())
    return path
