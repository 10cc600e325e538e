"""The model card an exported model carries: how it was trained, in the Hub's format.

``fedsea export`` and ``SplitModel.export`` write a plain Hugging Face checkpoint; its
``README.md`` is a model card (YAML metadata that ``huggingface_hub.ModelCard`` reads, then
text): the base model, the cut (p, q), the LoRA, and for a federated run its rounds, clients,
mode, noise level and privacy budget and a description of the data. Built with
``huggingface_hub``'s own ``ModelCardData`` so the metadata is what the Hub validates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

CARD_FILE = "README.md"


@dataclass(frozen=True)
class TrainingRecord:
    """What a model card says about how the adapters were trained (unknown fields left ``None``).

    Args:
        base_model: the base model's name or source (``smollm2``, a Hub id, a folder).
        cut: (p, q), the blocks each client kept before and after the trunk (per client if they differ).
        lora: the parts' LoRA in one line (``SplitLora.summary``).
        rounds: federated rounds (None: not a federated run).
        clients: how many clients took part.
        mode: the federation mode (sequential, hierarchical, client-batch).
        noise: the noise on the hidden states that left the clients, in words.
        epsilon: the differential-privacy epsilon the run's accountant reports, if it has one.
        data: what the clients trained on, in words (a task and its partition, or the files).
    """

    base_model: str | None = None
    cut: str | None = None
    lora: str | None = None
    rounds: int | None = None
    clients: int | None = None
    mode: str | None = None
    noise: str | None = None
    epsilon: float | None = None
    data: str | None = None


def card_text(record: TrainingRecord) -> str:
    """The card's Markdown, YAML metadata first."""
    tags = ["fedsea", "lora", "split-learning"] + (["federated-learning"] if record.rounds else [])
    data = ModelCardData(
        base_model=record.base_model if record.base_model and "/" in record.base_model else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )
    how = "federated split fine-tuning" if record.rounds else "split fine-tuning"
    rows = [
        ("Base model", record.base_model),
        ("Cut (p, q)", record.cut),
        ("LoRA", record.lora),
        ("Rounds", record.rounds),
        ("Clients", record.clients),
        ("Mode", record.mode),
        ("Noise on the hidden states", record.noise),
        ("Privacy budget (epsilon)", f"{record.epsilon:g}" if record.epsilon is not None else None),
        ("Data", record.data),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows if value is not None)
    about = (
        f"The base model with LoRA adapters trained by {how} with fedsea, an implementation of "
        "FedSEA-LLaMA ([arXiv:2505.15683](https://arxiv.org/abs/2505.15683)): each client kept the "
        "embedding, the first p blocks and the last q blocks with the LM head, a server ran the "
        "blocks between them, and only hidden states and their gradients crossed the network. "
        "The adapters are merged into these weights: load them as any Hugging Face model."
    )
    title = f"# {record.base_model or 'A causal LM'}, fine-tuned with fedsea"
    return f"---\n{data.to_yaml()}\n---\n\n{title}\n\n{about}\n\n| | |\n|---|---|\n{table}\n"


def write_card(directory: str | os.PathLike[str], record: TrainingRecord) -> Path:
    """Write ``directory/README.md`` (a model card ``huggingface_hub.ModelCard.load`` reads)."""
    path = Path(directory) / CARD_FILE
    ModelCard(card_text(record)).save(path)
    return path
