"""The evaluation harness on the real default model (SmolLM2-135M-Instruct), end to end."""

from __future__ import annotations

import json
import math

import pytest

import fedsea
from fedsea import tasks
from fedsea.cli import main

pytestmark = pytest.mark.slow


def test_sst2_eval_end_to_end_through_the_cli_and_the_split(capsys, smollm2, smollm2_tokenizer):
    argv = ["eval", "--task", "sst2", "--limit", "20", "--predictions", "--no-progress"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("model smollm2-135m (unsplit)") and "accuracy" in lines[2]
    result = json.loads(lines[-1])
    assert result["task"] == "sst2" and result["num_examples"] == 20 and result["split"] == "validation"
    assert 0.0 <= result["metrics"]["accuracy"] <= 1.0
    assert any("split here" in note for note in result["notes"])
    predictions = [p["prediction"] for p in result["predictions"]]
    gold = [p["gold"] for p in result["predictions"]]
    assert set(predictions) <= {0, 1} and set(gold) == {0, 1}  # both labels among 20 shuffled rows
    # The same rows through the three parts give the same predictions (split inference is exact).
    split = fedsea.split_model(smollm2, 2, 2)
    through_split = tasks.evaluate("sst2", split, smollm2_tokenizer, limit=20, progress=False, keep_predictions=True)
    assert [p["prediction"] for p in through_split.predictions] == predictions
    assert through_split.metrics == pytest.approx(result["metrics"])


def test_the_verbalizers_are_what_the_model_answers(smollm2, smollm2_tokenizer):
    # With the chat template, the model's first reply token is one of the choices a good part
    # of the time; a broken template or verbalizer would leave them a sliver of the mass.
    examples, _ = tasks.get_task("sst2").examples("validation", limit=8)
    scores = tasks.score_choices(tasks.as_runner(smollm2), smollm2_tokenizer, examples, progress=False)
    mass = [sum(math.exp(s) for s in row) for row in scores]
    assert sum(mass) / len(mass) > 0.1 and max(mass) <= 1.0 + 1e-6


def test_prompt_ids_match_the_models_chat_template(smollm2_tokenizer):
    ex = tasks.get_task("rte").examples("validation", limit=1)[0][0]
    ids, start = tasks.encode_for_training(smollm2_tokenizer, ex)
    conversation = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.target}]
    full = smollm2_tokenizer.apply_chat_template(conversation, tokenize=False).rstrip("\n")
    assert ids == smollm2_tokenizer(full, add_special_tokens=False)["input_ids"]
    assert smollm2_tokenizer.decode(ids[start:]) == f"{ex.target}<|im_end|>"


def test_generation_gives_a_summary(smollm2, smollm2_tokenizer):
    examples, _ = tasks.get_task("xsum").examples(limit=20)
    shortest = sorted(examples, key=lambda e: len(e.prompt))[:2]  # keep the prefill small
    result = tasks.evaluate(
        "xsum", smollm2, smollm2_tokenizer, examples=shortest, max_new_tokens=16, progress=False, keep_predictions=True
    )
    for p in result.predictions:
        assert len(p["prediction"].split()) >= 4  # words, not an empty or special-token reply
        assert "<|im_end|>" not in p["prediction"]
    assert result.metrics["rouge1"] > 0.0  # a summary of the article shares words with its reference
