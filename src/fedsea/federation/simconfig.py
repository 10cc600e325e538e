"""The run file (TOML, or YAML) shared by ``fedsea simulate``, ``fedsea serve --run`` and ``fedsea join``.

Its schema is ``RunConfig`` (``fedsea.federation.runconfig``); ``fedsea config example`` prints
it as a complete, commented file. A run file is read by the generic loader (``fedsea.settings``):
the defaults, updated by the file, updated by ``section.key=value`` overrides (values parsed as
TOML). ``RunPlan`` hands the rest of fedsea the objects it takes, made from the ``RunConfig``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsea.config import NoiseConfig, OptimConfig, SplitLora
from fedsea.federation.config import MODES, FedConfig
from fedsea.federation.placement import ModelSettings, ServerSettings
from fedsea.federation.runconfig import (
    NOISE_LEVELS,
    ClientConfig,
    ClientOverrides,
    ClientPlan,
    FederationSettings,
    LoraPart,
    NoiseSettings,
    PrivacySettings,
    RunConfig,
    RunLora,
    RunSettings,
    RunWire,
    TaskSettings,
)
from fedsea.privacy.target import NoiseTarget
from fedsea.settings import apply_override, build, dump_toml, read_settings_file, to_tree

__all__ = [
    "NOISE_LEVELS",
    "ClientConfig",
    "ClientOverrides",
    "ClientPlan",
    "FederationSettings",
    "LoraPart",
    "ModelSettings",
    "NoiseSettings",
    "PrivacySettings",
    "RunConfig",
    "RunLora",
    "RunPlan",
    "RunSettings",
    "RunWire",
    "ServerSettings",
    "TaskSettings",
    "dump_tree",
    "example_run_file",
    "load_config",
    "load_plan",
    "releases_per_token",
]


@dataclass(frozen=True)
class RunPlan:
    """A loaded run: the ``RunConfig`` and the objects the rest of fedsea takes, made from it."""

    config: RunConfig

    @property
    def tree(self) -> dict[str, Any]:
        """The resolved settings as plain data (unset values left out)."""
        return to_tree(self.config)

    @property
    def fed(self) -> FedConfig:
        """The server's round settings (FedConfig) with the run's seed, LoRA and, for per-part LoRA, cut."""
        lora = self.lora
        # One spec for all parts stays a single LoraSpec: the FedConfig of every run before per-part LoRA.
        spec = lora.uniform_spec or lora
        return self.config.federation.fed_config(self.config.run.seed, spec, self.config.lora_cut())

    @property
    def clients(self) -> tuple[ClientPlan, ...]:
        """Each client's resolved settings, overrides applied."""
        return self.config.client_plans()

    @property
    def lora(self) -> SplitLora:
        """The LoRA of each part: ``[lora]`` updated by ``[lora.head]``, ``[lora.trunk]``, ``[lora.tail]``."""
        return self.config.lora.parts()

    @property
    def lora_cut(self) -> tuple[int, int] | None:
        """Every client's (p, q) when the parts' LoRA differ (None: one spec, any cut)."""
        return self.config.lora_cut()

    @property
    def optim(self) -> OptimConfig:
        """The clients' local optimizer."""
        return self.config.optim

    @property
    def noise(self) -> NoiseTarget:
        """The noise level each client resolves on its own head."""
        return self.config.noise.target()

    @property
    def grad_noise(self) -> NoiseConfig:
        """Noise on the gradient sent up to the trunk."""
        return self.config.noise.grad_noise()

    @property
    def model(self) -> str:
        """The model source every party loads."""
        return self.config.model.source

    @property
    def wire_dtype(self) -> str:
        """The dtype of hidden states on the wire."""
        return self.config.wire.dtype

    @property
    def tls(self) -> bool:
        """Whether simulate runs the wire over mutual TLS."""
        return self.config.wire.tls

    @property
    def head_regularizer(self) -> str:
        """The privacy regularizer on each client's head (``none``, ``nopeek``, ``adversarial``)."""
        return self.config.privacy.head_regularizer

    @property
    def regularizer_weight(self) -> float:
        """The weight of that regularizer in the loss."""
        return self.config.privacy.regularizer_weight


def _noise_levels(noise: dict[str, Any], from_overrides: set[str], from_file: set[str]) -> None:
    """Resolve the noise levels in the merged ``[noise]`` table, in place.

    The last source that names a level (``noise.sigma``, ``noise.relative_sigma``,
    ``noise.epsilon``) decides it: the levels it does not name are unset, so that ``noise.sigma=0``
    on the command line turns off a file's ``relative_sigma`` (and a file's ``sigma`` replaces the
    default ``relative_sigma``). A level given as 0 is unset too (older files wrote 0 for every
    level they did not use); when that leaves none, the noise is off (``sigma = 0``).
    """
    for given in (from_overrides, from_file):
        named = given & set(NOISE_LEVELS)
        if named:
            for level in set(NOISE_LEVELS) - named:
                noise[level] = None
            break
    zeros = [n for n in NOISE_LEVELS if isinstance(noise.get(n), (int, float)) and noise.get(n) == 0]
    for level in zeros:
        noise[level] = None
    default = NoiseSettings()
    if zeros and all(noise.get(n, getattr(default, n)) is None for n in NOISE_LEVELS):
        noise["sigma"] = 0.0


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults, updated by the file (TOML, or YAML for ``.yaml``/``.yml``), updated by the overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = read_settings_file(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read run file {path}: {exc}") from exc
    if path is not None:
        absolute_data_paths(data, Path(path).parent)  # the file's relative data paths are its folder's
    from_file = set(data["noise"]) if isinstance(data.get("noise"), dict) else set()
    from_overrides: set[str] = set()
    for assignment in overrides:
        keys = apply_override(data, assignment)
        if keys[0] == "noise" and len(keys) == 2:
            from_overrides.add(keys[1])
    if isinstance(data.get("noise"), dict):
        _noise_levels(data["noise"], from_overrides, from_file)
    absolute_data_paths(data, Path.cwd())  # an override's relative path is the working folder's
    return build(RunConfig, data)


def absolute_data_paths(tree: dict[str, Any], folder: Path) -> None:
    """Make the relative ``data`` paths of ``[task]`` and each ``[[clients]]`` absolute against
    ``folder``, in place: every party (and a ``--resume`` from the run folder's resolved
    ``config.toml``) then reads the same files wherever it runs from."""
    tables = [tree.get("task")] + (list(tree["clients"]) if isinstance(tree.get("clients"), list) else [])
    for table in tables:
        if isinstance(table, dict) and isinstance(table.get("data"), str) and table["data"]:
            table["data"] = os.path.abspath(folder / os.path.expanduser(table["data"]))


def load_plan(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> RunPlan:
    """The run file at ``path`` (or the defaults) with the overrides, as a ``RunPlan``."""
    return RunPlan(load_config(path, overrides))


def dump_tree(tree: dict[str, Any] | RunConfig) -> str:
    """The resolved run file as TOML (the ``RunConfig``, or its ``to_tree`` data)."""
    return dump_toml(tree)


def example_run_file(mode: str = FedConfig.mode) -> str:
    """A complete, commented run file of the defaults for ``mode``: the run file's schema."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    config = RunConfig(federation=FederationSettings(mode=mode))
    header = [
        f"# A fedsea run file ({mode} mode): every setting, at its default. Load it with",
        "# `fedsea simulate run.toml [section.key=value ...]`, `fedsea serve --run` or `fedsea join --run`.",
        "# Unset settings are commented out; a table may be left out or given in part.",
    ]
    return "\n".join(header) + "\n\n" + dump_toml(config, comments=True)


def releases_per_token(rounds: int, local_steps: int, batch_size: int, num_examples: int) -> int:
    """The most times one example's h_p is sent in a run: each round draws ``local_steps`` batches
    from fresh shuffled epochs, so an example is sent at most ceil(steps x batch / examples) times
    a round (the accountant composes over these releases)."""
    return rounds * max(1, math.ceil(local_steps * batch_size / max(1, num_examples)))
