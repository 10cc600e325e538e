"""fedsea's adapters in peft's own format, for the tools that read it.

fedsea keeps one adapter per part (``head/``, ``trunk/``, ``tail/``: a LoRA spec, the layers it
covers and tensors keyed by the part's parameter names). peft reads neither that layout nor those
keys. ``save_peft`` writes, beside it, what ``PeftModel.from_pretrained(base, folder)`` loads:

- ``peft/``: the whole model's LoRA as one adapter (every part's tensors together);
- ``peft/head``, ``peft/trunk``, ``peft/tail``: each part alone.

Each is peft's ``adapter_config.json`` (written by ``peft.LoraConfig.save_pretrained``) and
``adapter_model.safetensors`` with peft's keys (``base_model.model.model.layers.3.self_attn.
q_proj.lora_A.weight``). The config names the adapted modules exactly (their full names, so a
head adapter touches only the head's blocks), and the parts' ranks and alphas through peft's
``rank_pattern`` / ``alpha_pattern`` where they differ. Written by fedsea rather than by
``PeftModel.save_pretrained`` because fedsea's adapters are injected into split views of one
model (``peft.inject_adapter_in_model``), never wrapped in a ``PeftModel``, and the trunk's
tensors may come from the server.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from fedsea.config import LoraSpec
from fedsea.errors import AdapterError
from fedsea.io import atomic_directory

PEFT_FOLDER = "peft"
PEFT_WEIGHTS = "adapter_model.safetensors"
# Where a part's parameter names sit in the causal LM (``fedsea.model.split.SplitPart``): blocks,
# embedding and final norm under ``model.``, the LM head at the top.
_MODEL_PREFIXES = ("layers.", "embed_tokens.", "norm.")
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def model_key(part_key: str) -> str:
    """A part's parameter name as the whole causal LM names it (``layers.3.x`` -> ``model.layers.3.x``)."""
    return f"model.{part_key}" if part_key.startswith(_MODEL_PREFIXES) else part_key


def _module_of(key: str) -> str:
    for suffix in _LORA_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise AdapterError(f"{key!r} is not a LoRA A or B weight: peft's format holds LoRA tensors only")


def peft_adapter(
    parts: Mapping[str, tuple[LoraSpec, Mapping[str, torch.Tensor]]], base_model: str | None = None
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """One peft LoRA adapter (config, tensors with peft's keys) from parts' (spec, part-keyed tensors).

    Raises:
        AdapterError: no tensors, or a tensor that is not a LoRA weight.
    """
    tensors: dict[str, torch.Tensor] = {}
    spec_of: dict[str, LoraSpec] = {}  # adapted module (full name) -> its part's spec
    for spec, state in parts.values():
        for key, value in state.items():
            full = model_key(key)
            spec_of[_module_of(full)] = spec
            tensors[f"base_model.model.{full}"] = value.detach().contiguous()
    if not tensors:
        raise AdapterError("no LoRA tensors to write in peft's format")
    # The most common rank and alpha are the defaults; the others go to peft's per-module patterns.
    r = Counter(s.r for s in spec_of.values()).most_common(1)[0][0]
    alpha = Counter(s.alpha for s in spec_of.values()).most_common(1)[0][0]
    dropout = Counter(s.dropout for s in spec_of.values()).most_common(1)[0][0]  # training only
    modules = sorted(spec_of)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; it only divides by r
        lora_dropout=dropout,
        target_modules=modules,  # full names: peft adapts exactly these modules
        rank_pattern={m: s.r for m, s in spec_of.items() if s.r != r},
        alpha_pattern={m: s.alpha for m, s in spec_of.items() if s.alpha != alpha},
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    return config, tensors


def write_peft_adapter(
    directory: str | os.PathLike[str],
    parts: Mapping[str, tuple[LoraSpec, Mapping[str, torch.Tensor]]],
    base_model: str | None = None,
) -> Path:
    """Write one peft adapter of ``parts`` to ``directory`` (atomic); see ``peft_adapter``."""
    config, tensors = peft_adapter(parts, base_model)
    with atomic_directory(directory) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
    return Path(directory)


def save_peft(
    directory: str | os.PathLike[str],
    parts: Mapping[str, tuple[LoraSpec, Mapping[str, torch.Tensor]]],
    base_model: str | None = None,
) -> Path:
    """``directory/peft``: the whole model's LoRA, and ``peft/<part>`` each part alone (atomic)."""
    folder = Path(directory) / PEFT_FOLDER
    with atomic_directory(folder) as tmp:
        config, tensors = peft_adapter(parts, base_model)
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        for name, part in parts.items():
            if part[1]:
                write_peft_adapter(tmp / name, {name: part}, base_model)
    return folder
