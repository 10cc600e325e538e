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
"""

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
from fedsea.version import __version__

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
