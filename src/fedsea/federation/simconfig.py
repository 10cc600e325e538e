"""The run file (TOML, or YAML) shared by ``fedsea simulate``, ``fedsea serve --run`` and ``fedsea join``.

::

    [model]      source = "smollm2-135m"
    [task]       name = "sst2", train_limit = 300, eval_limit = 100, partition = "iid", alpha = 0.5
    [federation] clients = 3, rounds = 3, local_steps = 10, mode = "hierarchical", ...
    [client]     head_layers = 2, tail_layers = 2, batch_size = 4, max_length = 128
    [[clients]]  head_layers = 4      # optional, one table per client: overrides of [client]
    [lora]       r = 8, alpha = 16, dropout = 0.0, target_modules = ["q_proj", ...]
    [optim]      lr = 1e-3
    [noise]      relative_sigma = 0.14 (the recommended default: sigma = 0.14 x RMS of h_p, measured
                 by each client on public text at start-up), or sigma = 0.5 (absolute std), or
                 epsilon = 8 with delta = 1e-5 and clip_norm (a DP target over the run's releases);
                 one of the three (setting sigma or epsilon drops the relative default; sigma = 0
                 is no noise); clip_norm = 0 (0: no clipping), grad_sigma = 0.0, grad_clip_norm = 0
                 (grad_*: the gradient sent up to the trunk)
    [privacy]    head_regularizer = "none" ("nopeek" or "adversarial": a privacy loss each client's
                 head trains with, PRIVACY.md), regularizer_weight = 1.0
    [wire]       dtype = "fp32", tls = true, latency_ms = 0, mbps = 0 (emulated WAN on each client)
    [run]        seed = 0

Any key can be overridden on the command line as ``section.key=value`` (values parsed as TOML).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsea.config import RECOMMENDED_RELATIVE_SIGMA, LoraSpec, NoiseConfig, OptimConfig
from fedsea.federation.config import FedConfig
from fedsea.privacy.calibration import NoiseTarget
from fedsea.privacy.regularizers import HEAD_REGULARIZERS

DEFAULTS: dict[str, Any] = {
    "model": {"source": "smollm2-135m"},
    "task": {
        "name": "sst2",
        "train_split": "train",
        "train_limit": 300,
        "eval_limit": 100,
        "partition": "iid",
        "alpha": 0.5,
    },
    "federation": {
        "clients": 3,
        "rounds": 3,
        "local_steps": 10,
        "mode": "hierarchical",
        "strategy": "fedavg",
        "fraction": 1.0,
        "min_clients": 1,
        "round_timeout_s": 600.0,
        "join_timeout_s": 600.0,
    },
    "client": {"head_layers": 2, "tail_layers": 2, "batch_size": 4, "max_length": 128},
    "clients": [],
    "lora": {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "optim": {"lr": 1e-3, "weight_decay": 0.01, "max_grad_norm": 1.0},
    "noise": {
        "sigma": 0.0,
        "relative_sigma": RECOMMENDED_RELATIVE_SIGMA,
        "epsilon": 0.0,
        "delta": 1e-5,
        "clip_norm": 0.0,
        "grad_sigma": 0.0,
        "grad_clip_norm": 0.0,
    },
    "privacy": {"head_regularizer": "none", "regularizer_weight": 1.0},
    "wire": {"dtype": "fp32", "tls": True, "latency_ms": 0.0, "mbps": 0.0},
    "run": {"seed": 0},
}


def _merge(base: dict[str, Any], extra: dict[str, Any], where: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        path = f"{where}{key}"
        if key not in base:
            raise ValueError(f"unknown setting {path!r}; known: {', '.join(sorted(base))}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{path} must be a table")
            out[key] = _merge(base[key], value, f"{path}.")
        else:
            out[key] = value
    return out


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """``section.key=value``: value parsed as TOML (``3``, ``0.5``, ``"text"``, ``true``, ``[1, 2]``)."""
    if "=" not in assignment:
        raise ValueError(f"an override is section.key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word: take it as a string
    node = tree
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], dict):
            raise ValueError(f"unknown setting {dotted!r}")
        node = node[part]
    if parts[-1] not in node:
        raise ValueError(f"unknown setting {dotted!r}")
    node[parts[-1]] = value


def _read_run_file(file: Path) -> dict[str, Any]:
    text = file.read_text()
    if file.suffix.lower() not in (".yaml", ".yml"):
        return tomllib.loads(text)  # TOMLDecodeError is a ValueError
    import yaml  # PyYAML: already required by transformers

    try:
        data = yaml.safe_load(text)  # safe_load: plain data only, never Python objects
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"the top level must be a mapping of sections, got {type(data).__name__}")
    return data


# The noise levels of which a run file sets one; the first is the default's.
NOISE_LEVELS: tuple[str, ...] = ("relative_sigma", "sigma", "epsilon")


def load_tree(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Defaults, updated by the file (TOML, or YAML for ``.yaml``/``.yml``), updated by the overrides.

    The last source that names a noise level (``noise.sigma``, ``noise.relative_sigma``,
    ``noise.epsilon``) decides it: the levels it does not name are reset to 0, so that
    ``noise.sigma=0`` on the command line turns off a file's ``relative_sigma`` (and a file's
    ``sigma`` replaces the default ``relative_sigma``).
    """
    tree = copy.deepcopy(DEFAULTS)
    from_file: set[str] = set()
    from_overrides: set[str] = set()
    if path is not None:
        file = Path(path)
        try:
            data = _read_run_file(file)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read run file {file}: {exc}") from exc
        tree = _merge(tree, data)
        if isinstance(data.get("noise"), dict):
            from_file |= set(data["noise"])
    for assignment in overrides:
        apply_override(tree, assignment)
        section, _, key = assignment.split("=", 1)[0].strip().partition(".")
        if section == "noise":
            from_overrides.add(key)
    for given in (from_overrides, from_file):
        named = given & set(NOISE_LEVELS)
        if named:
            for level in set(NOISE_LEVELS) - named:
                tree["noise"][level] = 0.0
            break
    return tree


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_tree(tree: dict[str, Any]) -> str:
    """The resolved run file as TOML (tables of scalars and lists, and [[clients]])."""
    lines: list[str] = []
    for section, body in tree.items():
        if section == "clients":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
        lines.append("")
    for client in tree.get("clients", []):
        lines.append("[[clients]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in client.items()]
        lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class ClientPlan:
    name: str
    head_layers: int
    tail_layers: int
    batch_size: int
    max_length: int


@dataclass(frozen=True)
class RunPlan:
    """The typed, validated view of a run file."""

    tree: dict[str, Any]
    fed: FedConfig
    clients: tuple[ClientPlan, ...]
    lora: LoraSpec
    optim: OptimConfig
    noise: NoiseTarget
    model: str
    wire_dtype: str
    tls: bool
    grad_noise: NoiseConfig = field(default_factory=NoiseConfig)
    head_regularizer: str = "none"
    regularizer_weight: float = 1.0

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> RunPlan:
        f, lo, op, no = tree["federation"], tree["lora"], tree["optim"], tree["noise"]
        lora = LoraSpec(int(lo["r"]), float(lo["alpha"]), float(lo["dropout"]), tuple(lo["target_modules"]))
        count = int(f["clients"])
        fed = FedConfig(
            rounds=int(f["rounds"]),
            local_steps=int(f["local_steps"]),
            mode=str(f["mode"]),
            strategy=str(f["strategy"]),
            fraction=float(f["fraction"]),
            min_clients=int(f["min_clients"]),
            expected_clients=count,
            round_timeout_s=float(f["round_timeout_s"]),
            join_timeout_s=float(f["join_timeout_s"]),
            seed=int(tree["run"]["seed"]),
            lora=lora,
        )
        overrides = list(tree.get("clients", []))
        if len(overrides) > count:
            raise ValueError(f"{len(overrides)} [[clients]] tables for federation.clients = {count}")
        plans = []
        for i in range(count):
            c = {**tree["client"], **(overrides[i] if i < len(overrides) else {})}
            unknown = set(c) - set(DEFAULTS["client"])
            if unknown:
                raise ValueError(f"unknown client setting(s) {sorted(unknown)}")
            plans.append(
                ClientPlan(
                    f"client-{i}",
                    int(c["head_layers"]),
                    int(c["tail_layers"]),
                    int(c["batch_size"]),
                    int(c["max_length"]),
                )
            )
        optim = OptimConfig(
            lr=float(op["lr"]), weight_decay=float(op["weight_decay"]), max_grad_norm=float(op["max_grad_norm"]) or None
        )
        noise = noise_target(no)
        grad_noise = NoiseConfig(sigma=float(no["grad_sigma"]), clip_norm=float(no["grad_clip_norm"]) or None)
        privacy = tree["privacy"]
        regularizer, weight = str(privacy["head_regularizer"]), privacy["regularizer_weight"]
        if regularizer not in HEAD_REGULARIZERS:
            raise ValueError(
                f"privacy.head_regularizer must be one of {', '.join(HEAD_REGULARIZERS)}, got {regularizer!r}"
            )
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"privacy.regularizer_weight must be a finite number >= 0, got {weight!r}")
        wire = tree["wire"]
        if wire["dtype"] not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"wire.dtype must be fp32, bf16 or fp16, got {wire['dtype']!r}")
        return cls(
            tree,
            fed,
            tuple(plans),
            lora,
            optim,
            noise,
            str(tree["model"]["source"]),
            str(wire["dtype"]),
            bool(wire["tls"]),
            grad_noise,
            regularizer,
            float(weight),
        )


def noise_target(section: dict[str, Any]) -> NoiseTarget:
    """The ``[noise]`` table's level as a ``NoiseTarget`` (``ValueError`` when more than one is set)."""
    levels = {}
    for name in NOISE_LEVELS:
        try:
            levels[name] = float(section[name])
        except (TypeError, ValueError):
            raise ValueError(f"noise.{name} must be a number, got {section[name]!r}") from None
    chosen = [name for name in NOISE_LEVELS if levels[name] != 0]
    if len(chosen) > 1:
        given = " and ".join(f"noise.{n} = {levels[n]:g}" for n in chosen)
        raise ValueError(f"set one noise level of {', '.join(NOISE_LEVELS)}, got {given}")
    level = chosen[0] if chosen else "sigma"
    clip = float(section["clip_norm"]) or None
    return NoiseTarget(**{level: levels[level]}, delta=float(section["delta"]), clip_norm=clip)


def releases_per_token(rounds: int, local_steps: int, batch_size: int, num_examples: int) -> int:
    """The most times one example's h_p is sent in a run: each round draws ``local_steps`` batches
    from fresh shuffled epochs, so an example is sent at most ceil(steps x batch / examples) times
    a round (the accountant composes over these releases)."""
    return rounds * max(1, math.ceil(local_steps * batch_size / max(1, num_examples)))


def load_plan(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> RunPlan:
    return RunPlan.from_tree(load_tree(path, overrides))
