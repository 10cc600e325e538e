"""An exported model carries a model card that ``huggingface_hub`` reads and that says how it was trained."""

from __future__ import annotations

from huggingface_hub import ModelCard

import fedsea
from fedsea.model.model_card import TrainingRecord, card_text


def test_an_export_writes_a_card_with_the_cut_and_the_lora(tmp_path):
    split = fedsea.split_model(fedsea.tiny_llama(), 1, 2).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    split.export(tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "transformers" and "fedsea" in card.data.tags
    assert "federated-learning" not in card.data.tags  # not a federated run
    assert "| Cut (p, q) | (1, 2) |" in card.text and "r=4" in card.text


def test_a_federated_record_names_rounds_clients_noise_epsilon_and_data():
    record = TrainingRecord(
        base_model="meta-llama/Llama-2-7b-hf", cut="(2, 2)", rounds=5, clients=3, mode="sequential",
        noise="epsilon 8 at delta 1e-05 (clip norm 1)", epsilon=8.0, data="three hospitals' notes",
    )  # fmt: skip
    text = card_text(record)
    card = ModelCard(text)
    assert card.data.base_model == "meta-llama/Llama-2-7b-hf" and "federated-learning" in card.data.tags
    for row in ("| Rounds | 5 |", "| Clients | 3 |", "| Privacy budget (epsilon) | 8 |", "three hospitals' notes"):
        assert row in text
