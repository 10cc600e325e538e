"""A federated run's result as adapters: a round checkpoint (``RUN/checkpoints/round-NNNN``) or a
run folder (its latest round) wherever an ``--adapters`` folder is taken (``fedsea generate``,
``chat``, ``eval``).

A round's ``global.safetensors`` holds the whole model's LoRA, keyed by parameter name with global
layer numbers (``layers.3.self_attn.q_proj.lora_A.weight``): each part of a split at any (p, q)
takes the blocks it holds from it, with the run's LoRA spec for that part. The client then holds
head and tail, and its trunk part's LoRA is what ``SplitClient`` uploads to the trunk server for its
session on connect, as for a saved ``trunk/`` adapter. The run's (p, q) (``run_cut``) is the
default split.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedsea.errors import AdapterError

CHECKPOINT_FILES = ("global.safetensors", "state.json")


def run_source(path: str | os.PathLike[str]) -> tuple[Path, Path] | None:
    """(run folder, round folder) when ``path`` is a round checkpoint or a run folder; None when it
    is neither (an adapter folder, say).

    Raises:
        ValueError: a run folder without any completed round.
        CheckpointError: a broken ``checkpoints/LATEST``.
    """
    from fedsea.federation.checkpoint import latest_round

    folder = Path(path)
    if all((folder / f).is_file() for f in CHECKPOINT_FILES) and folder.parent.name == "checkpoints":
        return folder.parent.parent, folder
    if (folder / "config.toml").is_file() and (folder / "checkpoints").is_dir():
        latest = latest_round(folder)
        if latest is None:
            raise ValueError(f"{folder}: the run has no completed round yet (no checkpoints/LATEST)")
        return folder, latest
    return None


def _plan(run_dir: Path) -> Any:
    from fedsea.federation.simconfig import load_plan

    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir}: no config.toml, the run's resolved settings (needed for its LoRA)")
    return load_plan(run_dir / "config.toml")


def run_cut(path: str | os.PathLike[str]) -> tuple[int, int]:
    """The (p, q) the run's clients trained at: the run's one cut (per-part LoRA), else client-0's."""
    source = run_source(path)
    if source is None:
        raise ValueError(f"{path} is not a run folder or a round checkpoint")
    plan = _plan(source[0])
    if plan.lora_cut is not None:
        p, q = plan.lora_cut
        return p, q
    first = plan.clients[0]
    return first.head_layers, first.tail_layers


def load_run_adapters(split: Any, path: str | os.PathLike[str]) -> int:
    """Give each part of ``split`` its blocks' LoRA from the run's global adapter; return the round.

    Raises:
        AdapterError: the split's cut differs from the run's where the parts' LoRA differ, or the
            checkpoint does not hold the split's LoRA tensors.
    """
    from safetensors.torch import load_file

    from fedsea.federation.checkpoint import load_round
    from fedsea.model.adapters import add_lora, load_adapter_state_dict

    source = run_source(path)
    if source is None:
        raise ValueError(f"{path} is not a run folder or a round checkpoint")
    run_dir, round_dir = source
    plan = _plan(run_dir)
    cut = (split.head_layers, split.tail_layers)
    if plan.lora_cut is not None and tuple(plan.lora_cut) != cut:
        raise AdapterError(
            f"{path}: the run's parts have different LoRA ({plan.lora.summary()}), trained at (p, q) = "
            f"{tuple(plan.lora_cut)}; split there (--head-layers {plan.lora_cut[0]} --tail-layers {plan.lora_cut[1]})"
        )
    round_number = load_round(round_dir)[0]  # checks the round's files in full, names a broken one
    state = load_file(str(round_dir / "global.safetensors"))
    specs = plan.lora
    for name, part in split.parts().items():
        if getattr(part, "lora_spec", None) is None:
            add_lora(part, getattr(specs, name))
        load_adapter_state_dict(part, state, strict=False)
    return int(round_number)


__all__ = ["load_run_adapters", "run_cut", "run_source"]
