"""Round checkpoints: global adapters, optimizer states, round number and RNG states.

Layout of a run folder::

    run/checkpoints/round-0003/global.safetensors    the global adapter after round 3
    run/checkpoints/round-0003/optim-<name>.safetensors   optimizer states, flattened
    run/checkpoints/round-0003/state.json            round, RNG states, metrics, config hash
    run/checkpoints/LATEST                           "round-0003", replaced atomically

Each round folder is written into a temporary folder and renamed, and ``LATEST`` is
replaced only after it, so a run killed at any moment resumes from a complete round.

Reading is strict: a ``LATEST`` that names no complete round, a ``state.json`` that is not the
JSON ``save_round`` writes (round number, RNG state of the right size, optimizer metadata) or
an unreadable safetensors file raises ``CheckpointError`` naming the file and the problem, so
``--resume`` and ``fedsea export`` refuse a broken checkpoint instead of silently starting over
or merging garbage. Only a run folder with no ``LATEST`` at all has no checkpoint (``None``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedsea.errors import FedseaError
from fedsea.io import atomic_directory, atomic_write_text

# What ``save_round`` names a round folder (and ``LATEST`` holds).
ROUND_NAME = re.compile(r"round-(\d{4,})")


class CheckpointError(FedseaError, ValueError):
    """A run folder's checkpoint that cannot be resumed or exported; the message names the file."""


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a torch optimizer ``state_dict`` into tensors (safetensors) and JSON (the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        meta: dict[str, Any] = {}
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{slot}"] = value.detach().contiguous().clone()
            else:
                meta[slot] = value
        per_param[str(index)] = meta
    return tensors, {"param_groups": state["param_groups"], "scalars": per_param}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, slot = key.split(".", 1)
        state.setdefault(int(index), {})[slot] = value
    for index, scalars in meta["scalars"].items():
        state.setdefault(int(index), {}).update(scalars)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_round(
    run_dir: str | os.PathLike[str],
    round_number: int,
    global_state: dict[str, torch.Tensor],
    optimizers: dict[str, dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write round ``round_number``'s checkpoint and point ``LATEST`` at it."""
    root = Path(run_dir) / "checkpoints"
    name = f"round-{round_number:04d}"
    meta_optim: dict[str, Any] = {}
    with atomic_directory(root / name) as tmp:
        save_file({k: v.contiguous() for k, v in global_state.items()}, str(tmp / "global.safetensors"))
        for opt_name, opt_state in (optimizers or {}).items():
            tensors, meta = _flatten_optimizer(opt_state)
            save_file(tensors, str(tmp / f"optim-{opt_name}.safetensors"))
            meta_optim[opt_name] = meta
        state = {
            "round": round_number,
            "torch_rng": torch.random.get_rng_state().tolist(),
            "optimizers": meta_optim,
            **(extra or {}),
        }
        (tmp / "state.json").write_text(json.dumps(state))
    atomic_write_text(root / "LATEST", name)
    return root / name


def latest_round(run_dir: str | os.PathLike[str]) -> Path | None:
    """The folder of the newest complete round checkpoint under ``run_dir``; ``None`` if there is none.

    Raises:
        CheckpointError: ``LATEST`` exists but does not name a round folder holding a ``state.json``
            (resuming would silently start the run over).
    """
    pointer = Path(run_dir) / "checkpoints" / "LATEST"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer} cannot be read: {exc}") from exc
    if ROUND_NAME.fullmatch(name) is None:
        raise CheckpointError(f"{pointer} should name a round folder (round-NNNN), holds {name[:60]!r}")
    folder = pointer.parent / name
    if not (folder / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {name}, but {folder / 'state.json'} does not exist")
    return folder


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def _check_state(path: Path, folder: Path) -> dict[str, Any]:
    """``state.json`` parsed and checked field by field (``CheckpointError`` naming the field)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} should hold a JSON object, holds {type(state).__name__}")
    number = state.get("round")
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise CheckpointError(f"{path}: 'round' should be an integer >= 1, got {number!r}")
    named = ROUND_NAME.fullmatch(folder.name)
    if named is not None and int(named.group(1)) != number:
        raise CheckpointError(f"{path}: 'round' is {number} but the folder is {folder.name}")
    rng = state.get("torch_rng")
    size = torch.random.get_rng_state().numel()  # (5056,) uint8 for the CPU generator
    if (
        not isinstance(rng, list)
        or len(rng) != size
        or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in rng)
    ):
        raise CheckpointError(f"{path}: 'torch_rng' should be a list of {size} bytes (the CPU RNG state)")
    try:  # the generator itself checks the state (a foreign generator: the process's is untouched)
        torch.Generator().set_state(torch.tensor(rng, dtype=torch.uint8))
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: 'torch_rng' is not a valid RNG state: {exc}") from exc
    optimizers = state.get("optimizers", {})
    if not isinstance(optimizers, dict) or not all(
        isinstance(m, dict) and isinstance(m.get("param_groups"), list) and isinstance(m.get("scalars"), dict)
        for m in optimizers.values()
    ):
        raise CheckpointError(f"{path}: 'optimizers' should map names to {{param_groups, scalars}}")
    return state


def load_round(
    folder: str | os.PathLike[str],
) -> tuple[int, dict[str, torch.Tensor], dict[str, dict[str, Any]], dict[str, Any]]:
    """(round number, global state, optimizer state dicts, the rest of state.json).

    Raises:
        CheckpointError: a missing or malformed file of the round, named with the problem.
    """
    path = Path(folder)
    state = _check_state(path / "state.json", path)
    global_state = _load_tensors(path / "global.safetensors")
    optimizers = {}
    for name, meta in state.pop("optimizers", {}).items():
        file = path / f"optim-{name}.safetensors"
        try:
            optimizers[name] = _unflatten_optimizer(_load_tensors(file), meta)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{file} does not match its metadata in state.json: {exc}") from exc
    return int(state.pop("round")), global_state, optimizers, state
