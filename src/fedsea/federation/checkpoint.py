"""Round checkpoints: global adapters, optimizer states, round number and RNG states.

Layout of a run folder::

    run/checkpoints/round-0003/global.safetensors    the global adapter after round 3
    run/checkpoints/round-0003/optim-<name>.safetensors   optimizer states, flattened
    run/checkpoints/round-0003/state.json            round, RNG states, metrics, config hash
    run/checkpoints/LATEST                           "round-0003", replaced atomically

Each round folder is written into a temporary folder and renamed, and ``LATEST`` is
replaced only after it, so a run killed at any moment resumes from a complete round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedsea.io import atomic_directory, atomic_write_text


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
    """The folder of the newest complete round checkpoint under ``run_dir``; ``None`` if there is none."""
    pointer = Path(run_dir) / "checkpoints" / "LATEST"
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if (folder / "state.json").is_file() else None


def load_round(
    folder: str | os.PathLike[str],
) -> tuple[int, dict[str, torch.Tensor], dict[str, dict[str, Any]], dict[str, Any]]:
    """(round number, global state, optimizer state dicts, the rest of state.json)."""
    path = Path(folder)
    state = json.loads((path / "state.json").read_text())
    global_state = load_file(str(path / "global.safetensors"))
    optimizers = {
        name: _unflatten_optimizer(load_file(str(path / f"optim-{name}.safetensors")), meta)
        for name, meta in state.pop("optimizers", {}).items()
    }
    return int(state.pop("round")), global_state, optimizers, state
