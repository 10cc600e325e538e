"""The initial global adapter of a federated run: every block's LoRA, drawn by peft under the run's seed."""

from __future__ import annotations

import torch

from fedsea.federation.config import FedConfig
from fedsea.model.adapters import adapter_state_dict, add_lora
from fedsea.model.seeding import seeded
from fedsea.model.split import SplitPart
from fedsea.server.trunk import TrunkHost


def initial_global_state(host: TrunkHost, config: FedConfig) -> dict[str, torch.Tensor]:
    """LoRA tensors for every block, each with its part's spec, initialised by peft with the run's seed."""
    parts, blocks = config.split_lora, host.num_layers
    if (uniform := parts.uniform_spec) is not None:
        # One view of every block: peft draws in block order, as every run before per-part LoRA did.
        views = [(SplitPart(host.model, 0, blocks), uniform)]
    else:
        assert config.cut is not None  # FedConfig requires the cut when the parts differ
        p, q = config.cut
        if p + q >= blocks:
            raise ValueError(f"cut (p, q) = {config.cut} leaves no trunk block in a {blocks}-block model")
        # Head, trunk and tail in turn under one seed: the draws of a SplitModel's add_lora at (p, q).
        ranges = ((0, p, parts.head), (p, blocks - q, parts.trunk), (blocks - q, blocks, parts.tail))
        views = [(SplitPart(host.model, start, end), spec) for start, end, spec in ranges if spec is not None]
    name = "fedsea_global_init"
    state: dict[str, torch.Tensor] = {}
    with host.computing(), seeded(config.seed):
        for view, spec in views:
            add_lora(view, spec, adapter_name=name)
            state.update(adapter_state_dict(view, name))
        from peft.tuners.tuners_utils import BaseTunerLayer

        for view, _ in views:
            for module in view.modules():
                if isinstance(module, BaseTunerLayer):
                    module.delete_adapter(name)
        host.adapters_changed()
    return state
