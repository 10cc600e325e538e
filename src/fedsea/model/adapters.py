"""LoRA per part with peft: inject, read and write adapter-only state, merge for export.

Each part gets its own ``peft.LoraConfig`` (rank, alpha, dropout, targets), injected with
``peft.inject_adapter_in_model`` into the part's own modules. Since the parts are views of
one model, the unsplit model sees the same adapters, which is what the centralized baseline
and the exactness tests need.

Adapter state dicts hold only LoRA tensors, keyed by the part's parameter names without
peft's adapter name (``layers.3.self_attn.q_proj.lora_A.weight``). Layer numbers are global,
so keys do not change when partition points move.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer, cast_adapter_dtype
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from fedsea.config import LoraSpec, SplitLora
from fedsea.errors import AdapterError

__all__ = ["AdapterError", "adapter_state_dict", "add_lora", "add_split_lora", "load_adapter", "save_adapter"]
from fedsea.io import atomic_directory
from fedsea.model.model_card import TrainingRecord

if TYPE_CHECKING:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    from fedsea.model.split import SplitModel, SplitPart

ADAPTER_NAME = "default"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def _tag(adapter_name: str) -> str:
    return f".{adapter_name}."


def family_targets(part: SplitPart, targets: tuple[str, ...]) -> tuple[str, ...]:
    """``targets`` named as the part's family names its modules (Phi-3: q/k/v_proj -> qkv_proj).

    Raises:
        AdapterError: naming each target (as the user gave it) that matches no linear layer of
            the part; peft itself only complains when none matches.
    """
    family = getattr(part, "family", None)
    aliases: Mapping[str, str] = family.target_aliases if family is not None else {}
    # A LoRA-wrapped layer (a second session's adapter on the server's shared blocks) still counts.
    linear = [
        name
        for name, module in part.named_modules()
        if isinstance(module, (nn.Linear, BaseTunerLayer)) and "lora_" not in name and not name.endswith("base_layer")
    ]

    def matches(target: str) -> bool:  # peft's rule: the whole name, or a dotted suffix
        return any(name == target or name.endswith("." + target) for name in linear)

    missing = [given for given in targets if not matches(aliases.get(given, given))]
    if missing:
        known = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise AdapterError(f"LoRA target(s) {missing} match no linear layer of the {part.part_name}; it has {known}")
    return family.lora_targets(targets) if family is not None else targets


def add_lora(part: SplitPart, spec: LoraSpec, adapter_name: str = ADAPTER_NAME) -> None:
    """Inject a LoRA adapter into ``part`` and freeze every non-LoRA parameter of it.

    Args:
        adapter_name: peft's adapter name. A server holds one adapter per session on the
            same shared blocks, each under its own name.
    """
    if getattr(part, "lora_spec", None) is not None:
        raise AdapterError(f"the {part.part_name} already has a LoRA adapter")
    targets = family_targets(part, spec.target_modules)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # peft annotates int; it only divides by r
        lora_dropout=spec.dropout,
        target_modules=list(targets),
        bias="none",
    )
    try:
        inject_adapter_in_model(config, part, adapter_name=adapter_name)
    except ValueError as exc:
        raise AdapterError(f"cannot add LoRA to the {part.part_name}: {exc}") from exc
    # peft makes LoRA weights in the base layer's dtype; on a bfloat16/float16 model they are
    # upcast to float32 (as peft's get_peft_model does), so AdamW's small updates are not rounded
    # away. peft casts the input to the adapter's dtype and the result back to the base's.
    cast_adapter_dtype(part, adapter_name)
    tag = _tag(adapter_name)
    for name, param in part.named_parameters():
        param.requires_grad_("lora_" in name and tag in name)
    # peft's new modules start in training mode (LoRA dropout on): give them their block's mode,
    # so an adapter added to a model in eval mode (e.g. before ``generate``) keeps it exact.
    for layer in part.layers.values():
        for name, module in layer.named_modules():
            if "lora_" in name:
                module.train(layer.training)
    part.lora_spec = spec  # type: ignore[assignment]  # nn.Module.__setattr__ is typed for tensors and modules; this is a plain attribute
    part.adapter_name = adapter_name  # type: ignore[assignment]  # nn.Module.__setattr__ is typed for tensors and modules; this is a plain attribute


def add_split_lora(split: SplitModel, lora: SplitLora | LoraSpec) -> None:
    """Add LoRA to each part of ``split``; a single ``LoraSpec`` applies to all three."""
    specs = SplitLora.uniform(lora) if isinstance(lora, LoraSpec) else lora
    # The base weights are public and frozen everywhere, also in parts left without LoRA.
    for name, param in split.model.named_parameters():
        if "lora_" not in name:
            param.requires_grad_(False)
    for name, part in split.parts().items():
        spec = getattr(specs, name)
        if spec is not None:
            add_lora(part, spec)


def adapter_parameters(part: nn.Module, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
    """The part's LoRA parameters of one adapter, keyed without the adapter name."""
    tag = _tag(adapter_name or cast(str, getattr(part, "adapter_name", ADAPTER_NAME)))
    return {name.replace(tag, "."): p for name, p in part.named_parameters() if "lora_" in name and tag in name}


def adapter_state_dict(part: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``part`` (detached CPU copies), keys without the adapter name.

    On the CPU whatever the part's device (its blocks may even be on several GPUs): a state is
    data to save, send or average with other parties' states.
    """
    return {k: p.detach().to("cpu", copy=True) for k, p in adapter_parameters(part, adapter_name).items()}


def load_adapter_state_dict(part: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy ``state`` into the LoRA tensors of ``part``.

    Args:
        strict: if True, the keys must match exactly; otherwise keys of ``state`` that this
            part does not hold are ignored (useful after partition points moved), but every
            LoRA tensor of the part must still be given.

    Raises:
        AdapterError: naming missing, unexpected or mis-shaped keys.
    """
    params = adapter_parameters(part)
    name = getattr(part, "part_name", type(part).__name__)
    if not params:
        raise AdapterError(f"the {name} has no LoRA adapter to load into")
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or (strict and unexpected):
        raise AdapterError(
            f"adapter does not match the {name}: missing {missing[:3]}{'...' if len(missing) > 3 else ''} "
            f"({len(missing)}), unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''} "
            f"({len(unexpected)})"
        )
    with torch.no_grad():
        for key, param in params.items():
            value = state[key]
            if tuple(value.shape) != tuple(param.shape):
                raise AdapterError(f"{key}: expected shape {tuple(param.shape)}, got {tuple(value.shape)}")
            param.copy_(value.to(dtype=param.dtype, device=param.device))


def save_adapter(part: SplitPart, directory: str | os.PathLike[str]) -> Path:
    """Write the part's adapter as ``adapter_model.safetensors`` + ``adapter_config.json`` (atomic)."""
    spec: LoraSpec | None = getattr(part, "lora_spec", None)
    if spec is None:
        raise AdapterError(f"the {part.part_name} has no LoRA adapter to save")
    state = {k: v.contiguous() for k, v in adapter_state_dict(part).items()}
    meta = {"part": part.part_name, "layers": [part.start, part.end], "lora": spec.to_dict()}
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "fedsea_part": part.part_name})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return Path(directory)


def save_split_adapters(split: SplitModel, directory: str | os.PathLike[str]) -> Path:
    """Each adapted part under ``directory/{head,trunk,tail}``, and the same in peft's format under
    ``directory/peft`` (``fedsea.model.peft_format``); written atomically, as one folder."""
    from fedsea.model.peft_format import save_peft

    parts = {name: part for name, part in split.parts().items() if getattr(part, "lora_spec", None) is not None}
    with atomic_directory(directory) as tmp:
        for name, part in parts.items():
            save_adapter(part, tmp / name)
        if parts:
            base = str(getattr(split.model.config, "_name_or_path", "") or "") or None
            specs = {name: cast(LoraSpec, part.lora_spec) for name, part in parts.items()}
            save_peft(tmp, {name: (specs[name], adapter_state_dict(part)) for name, part in parts.items()}, base)
    return Path(directory)


def read_adapter(directory: str | os.PathLike[str]) -> tuple[LoraSpec, dict[str, torch.Tensor], dict[str, object]]:
    """Read an adapter folder: its LoRA spec, tensors and metadata."""
    folder = Path(directory)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise AdapterError(f"{folder} is not an adapter folder (needs {WEIGHTS_FILE} and {CONFIG_FILE})")
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
        spec = LoraSpec.from_dict(meta["lora"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"{folder / CONFIG_FILE} is malformed: {exc}") from exc
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{folder / WEIGHTS_FILE} is not a readable safetensors file: {exc}") from exc
    return spec, state, meta


def load_adapter(part: SplitPart, directory: str | os.PathLike[str]) -> None:
    """Load a saved adapter into ``part``, adding LoRA with the saved spec if it has none."""
    spec, state, _ = read_adapter(directory)
    current: LoraSpec | None = getattr(part, "lora_spec", None)
    if current is None:
        add_lora(part, spec)
    elif (current.r, current.target_modules) != (spec.r, spec.target_modules):
        raise AdapterError(
            f"adapter at {directory} has r={spec.r}, targets={list(spec.target_modules)}; the {part.part_name} "
            f"has r={current.r}, targets={list(current.target_modules)}"
        )
    load_adapter_state_dict(part, state)


def merged_model(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of ``model`` with every LoRA adapter merged into its base weights (plain HF model)."""
    merged = copy.deepcopy(model)
    # The copy's base weights change: it must not inherit the original's cached fingerprint.
    merged.__dict__.pop("_fedsea_fingerprint", None)
    tuner_names = [name for name, module in merged.named_modules() if isinstance(module, BaseTunerLayer)]
    for name in tuner_names:
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name)
        module = getattr(parent, child)
        module.merge()
        setattr(parent, child, module.get_base_layer())
    return merged


def export_merged(
    split: SplitModel,
    directory: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase | None = None,
    record: TrainingRecord | None = None,
) -> Path:
    """Merge all three parts' adapters and write a plain Hugging Face checkpoint (atomic), with a
    model card (``README.md``) from ``record``; without one, from what the split itself knows."""
    from fedsea.model.model_card import write_card

    merged = merged_model(split.model)
    if record is None:
        specs = {name: getattr(part, "lora_spec", None) for name, part in split.parts().items()}
        record = TrainingRecord(
            base_model=str(getattr(split.model.config, "_name_or_path", "") or "") or None,
            cut=f"({split.head_layers}, {split.tail_layers})",
            lora=SplitLora(**specs).summary(),
        )
    with atomic_directory(directory) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_card(tmp, record)
    return Path(directory)
