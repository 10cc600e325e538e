"""Adapters in peft's format: ``PeftModel.from_pretrained`` (peft itself) loads what fedsea saves,
the whole model's LoRA and each part alone, and computes what fedsea's split model computes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftConfig, PeftModel

import fedsea
from fedsea.errors import AdapterError
from fedsea.model.peft_format import peft_adapter
from tests.conftest import assert_close_to_scale, randomize_lora

IDS = torch.tensor([[5, 9, 17, 33, 2, 41, 7, 11], [3, 8, 13, 21, 34, 55, 89, 14]])
LENGTHS = torch.tensor([8, 8])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return fedsea.central_forward(model, IDS, LENGTHS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A split whose parts carry different ranks and alphas, with random LoRA, saved once."""
    lora = fedsea.SplitLora(
        head=fedsea.LoraSpec(r=4, alpha=8.0, dropout=0.0),
        trunk=fedsea.LoraSpec(r=8, alpha=16.0, dropout=0.0, target_modules=("q_proj", "v_proj", "o_proj")),
        tail=fedsea.LoraSpec(r=2, alpha=3.0, dropout=0.0),
    )
    split = fedsea.split_model(fedsea.tiny_llama(), 1, 1).add_lora(lora)
    randomize_lora(split.model, seed=3, scale=0.2)
    folder = split.save_adapters(tmp_path_factory.mktemp("adapters") / "run")
    return split, folder


def test_the_whole_models_lora_loads_with_peft_and_equals_the_split(saved):
    split, folder = saved
    config = PeftConfig.from_pretrained(str(folder / "peft"))
    assert config.peft_type == "LORA" and config.task_type == "CAUSAL_LM"
    loaded = PeftModel.from_pretrained(fedsea.tiny_llama(), str(folder / "peft")).eval()
    # Every fedsea LoRA tensor is in the peft model, none added: same modules, same values.
    ours = {k: v for k, v in split.model.state_dict().items() if "lora_" in k}
    theirs = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(ours) == len(theirs)
    assert_close_to_scale(_logits(loaded), _logits(split.model.eval()), rel=1e-5)


@pytest.mark.parametrize("part", ["head", "trunk", "tail"])
def test_each_part_alone_loads_with_peft_and_touches_only_its_blocks(saved, part):
    _, folder = saved
    loaded = PeftModel.from_pretrained(fedsea.tiny_llama(), str(folder / "peft" / part)).eval()
    alone = folder.parent / f"only-{part}"
    if not alone.exists():
        shutil.copytree(folder / part, alone / part)
    only = fedsea.split_model(fedsea.tiny_llama(), 1, 1).load_adapters(alone)  # this part's adapter only
    assert_close_to_scale(_logits(loaded), _logits(only.model.eval()), rel=1e-5)
    start, end = getattr(only, part).start, getattr(only, part).end
    adapted = {int(name.split(".")[4]) for name, _ in loaded.named_modules() if name.endswith("lora_A")}
    assert adapted == set(range(start, end))


def test_ranks_and_alphas_that_differ_by_part_go_to_peft_patterns(saved):
    _, folder = saved
    config = json.loads((folder / "peft" / "adapter_config.json").read_text())
    assert config["r"] in (4, 8, 2) and config["rank_pattern"]
    assert all(m.startswith("model.layers.") for m in config["target_modules"])


def test_non_lora_tensors_are_refused():
    with pytest.raises(AdapterError, match="LoRA A or B"):
        peft_adapter({"head": (fedsea.LoraSpec(), {"layers.0.mlp.up_proj.weight": torch.zeros(2, 2)})})
