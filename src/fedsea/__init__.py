"""fedsea: federated split fine-tuning and split inference of LLaMA-family models.

Quick tour::

    import fedsea

    model = fedsea.load_model("smollm2-135m")          # or a HF folder, a .gguf, a Hub id
    tokenizer = fedsea.load_tokenizer("smollm2-135m")
    split = fedsea.split_model(model, head_layers=2, tail_layers=2)
    split.add_lora(fedsea.LoraSpec(r=8, alpha=16))
    h = split.head(input_ids, lengths)     # client: embedding + blocks [0, p)
    h = split.trunk(h, lengths)            # server: the middle blocks
    logits = split.tail(h, lengths)        # client: last q blocks, norm, LM head

The names below are imported on first use (PEP 562): ``import fedsea`` alone loads no torch,
transformers or gRPC, so that ``fedsea --help`` and the light modules start in a fraction of a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsea.lazy import lazy_exports
from fedsea.version import __version__

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from fedsea.client import ClientTls, GenerationConfig, GenerationOutput, SplitClient
    from fedsea.config import (
        LoraSpec,
        NoiseConfig,
        OptimConfig,
        Placement,
        ServerLimits,
        SplitConfig,
        SplitLora,
        WireConfig,
    )
    from fedsea.errors import (
        AdapterError,
        FedseaError,
        InvalidInputError,
        ModelLoadError,
        ModelNotFoundError,
        PartitionError,
        UnsupportedModelError,
    )
    from fedsea.model.adapters import merged_model
    from fedsea.model.load import DEFAULT_MODEL, cache_dir, load_model, load_tokenizer
    from fedsea.model.split import Head, SplitModel, Tail, Trunk, central_forward, split_model
    from fedsea.model.tiny import tiny_llama, tiny_tokenizer
    from fedsea.privacy.noise import Privatizer, privatize
    from fedsea.training import Batch, CentralTrainer, LocalTrunk, SplitTrainer, make_batch
    from fedsea.training.generation import split_greedy_generate
    from fedsea.training.stepper import CutTraffic

# Public name -> the module it is defined in (imported on first access).
_LAZY: dict[str, str] = {
    **dict.fromkeys(("ClientTls", "GenerationConfig", "GenerationOutput", "SplitClient"), "fedsea.client"),
    **dict.fromkeys(
        (
            "LoraSpec",
            "NoiseConfig",
            "OptimConfig",
            "Placement",
            "ServerLimits",
            "SplitConfig",
            "SplitLora",
            "WireConfig",
        ),
        "fedsea.config",
    ),
    **dict.fromkeys(
        (
            "AdapterError",
            "FedseaError",
            "InvalidInputError",
            "ModelLoadError",
            "ModelNotFoundError",
            "PartitionError",
            "UnsupportedModelError",
        ),
        "fedsea.errors",
    ),
    "merged_model": "fedsea.model.adapters",
    **dict.fromkeys(("DEFAULT_MODEL", "cache_dir", "load_model", "load_tokenizer"), "fedsea.model.load"),
    **dict.fromkeys(("Head", "SplitModel", "Tail", "Trunk", "central_forward", "split_model"), "fedsea.model.split"),
    **dict.fromkeys(("tiny_llama", "tiny_tokenizer"), "fedsea.model.tiny"),
    **dict.fromkeys(("Privatizer", "privatize"), "fedsea.privacy.noise"),
    **dict.fromkeys(("Batch", "CentralTrainer", "LocalTrunk", "SplitTrainer", "make_batch"), "fedsea.training"),
    "split_greedy_generate": "fedsea.training.generation",
    "CutTraffic": "fedsea.training.stepper",
}

__all__ = [
    "DEFAULT_MODEL",
    "AdapterError",
    "Batch",
    "CentralTrainer",
    "ClientTls",
    "CutTraffic",
    "FedseaError",
    "GenerationConfig",
    "GenerationOutput",
    "Head",
    "InvalidInputError",
    "LocalTrunk",
    "LoraSpec",
    "ModelLoadError",
    "ModelNotFoundError",
    "NoiseConfig",
    "OptimConfig",
    "PartitionError",
    "Placement",
    "Privatizer",
    "ServerLimits",
    "SplitClient",
    "SplitConfig",
    "SplitLora",
    "SplitModel",
    "SplitTrainer",
    "Tail",
    "Trunk",
    "UnsupportedModelError",
    "WireConfig",
    "__version__",
    "cache_dir",
    "central_forward",
    "load_model",
    "load_tokenizer",
    "make_batch",
    "merged_model",
    "privatize",
    "split_greedy_generate",
    "split_model",
    "tiny_llama",
    "tiny_tokenizer",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
