"""Every bad input of the foundation gets a clear error naming the problem."""

from __future__ import annotations

import json

import pytest
import torch

import fedsea


def test_missing_path_says_what_was_tried(tmp_path):
    with pytest.raises(fedsea.ModelNotFoundError, match="smollm2-135m"):
        fedsea.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):  # also a plain FileNotFoundError
        fedsea.load_tokenizer("./no/such/model")


def test_folder_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(fedsea.ModelNotFoundError, match=r"no config\.json"):
        fedsea.load_model(tmp_path)
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(fedsea.ModelNotFoundError, match="GGUF"):
        fedsea.load_model(weights)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(fedsea.UnsupportedModelError, match=r"gpt2.*supports: llama \(LlamaForCausalLM\)"):
        fedsea.load_model(tmp_path)
    with pytest.raises(fedsea.UnsupportedModelError, match="llama"):
        fedsea.split_model(torch.nn.Linear(2, 2), 1, 1)


@pytest.mark.parametrize(
    ("p", "q", "match"),
    [
        (0, 1, "head_layers must be an integer >= 1"),
        (1, 0, "tail_layers must be an integer >= 1"),
        (3, 3, r"must be < the model's 6 blocks.*3 \+ 3 = 6"),
        (5, 2, "7"),
        (1.5, 1, "head_layers"),
    ],
)
def test_partition_points_that_do_not_fit(tiny_model, p, q, match):
    with pytest.raises(fedsea.PartitionError, match=match):
        fedsea.split_model(tiny_model, p, q)


def test_bad_tensors_name_the_field(tiny_model, tiny_batch):
    split = fedsea.split_model(tiny_model, 2, 2)
    input_ids, lengths = tiny_batch
    hidden = split.head(input_ids, lengths).detach()
    cases = [
        (lambda: split.head(input_ids.float(), lengths), "input_ids", "int64"),
        (lambda: split.head(input_ids[0], lengths), "input_ids", "shape"),
        (lambda: split.head(input_ids + 10_000, lengths), "input_ids", r"\[0, 512\)"),
        (lambda: split.head(input_ids, lengths[:2]), "lengths", r"shape \(3,\)"),
        (lambda: split.head(input_ids, lengths * 0), "lengths", "min 0"),
        (lambda: split.head(input_ids, lengths + 100), "lengths", "max"),
        (lambda: split.head(input_ids, lengths.float()), "lengths", "integer dtype"),
        (lambda: split.trunk(hidden[..., :10], lengths), "hidden", r"\(batch, tokens, 64\)"),
        (lambda: split.trunk(hidden[:, :0], lengths), "hidden", "at least one token"),
        (lambda: split.trunk(hidden.long(), lengths), "hidden", "floating-point"),
        (lambda: split.tail(hidden.masked_fill(hidden > 1, float("nan")), lengths), "hidden", "NaN"),
        (lambda: split.tail(hidden * float("inf"), lengths), "hidden", "NaN or Inf"),
    ]
    for call, field, match in cases:
        with pytest.raises(fedsea.InvalidInputError, match=match) as info:
            call()
        assert info.value.field == field


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="r must be"):
        fedsea.LoraSpec(r=0)
    with pytest.raises(ValueError, match="dropout"):
        fedsea.LoraSpec(dropout=1.0)
    with pytest.raises(ValueError, match="target_modules"):
        fedsea.LoraSpec(target_modules=())
    with pytest.raises(ValueError, match="lr"):
        fedsea.OptimConfig(lr=0)
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        fedsea.tiny_tokenizer(100)
