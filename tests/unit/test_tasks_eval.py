"""Evaluation on the tiny random model: scoring, generation, split == unsplit, fine-tuning, CLI."""

from __future__ import annotations

import json

import pytest
import torch

import fedsea
from fedsea import tasks
from fedsea.cli import main
from fedsea.tasks.base import Example
from fedsea.tasks.runners import ModelRunner, SplitRunner
from tests.conftest import randomize_lora


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's matrices are too small for threads to pay; on a busy machine they cost 5x."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def lora_split(tiny_model):
    split = fedsea.split_model(tiny_model, 2, 2).add_lora(fedsea.LoraSpec(r=4, alpha=8, dropout=0.1))
    randomize_lora(tiny_model, seed=3)
    return split


def _single_token_words(tokenizer, count=2):
    words = [
        w for w in ("the", "and", "of", "a", "to", "in", "is", "it") if len(tasks.encode_answer(tokenizer, w)) == 1
    ]
    assert len(words) >= count
    return tuple(words[:count])


def _manual_score(model, tokenizer, ex, choice):
    prompt = tasks.encode_prompt(tokenizer, ex)
    answer = tasks.encode_answer(tokenizer, choice)
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = fedsea.central_forward(model, ids, torch.tensor([ids.shape[1]]))[0].log_softmax(-1)  # (n, V)
    return sum(float(logits[len(prompt) - 1 + k, t]) for k, t in enumerate(answer))


def test_choice_scores_are_the_log_likelihoods(lora_split, tiny_tokenizer):
    model = lora_split.model.eval()
    one, two = _single_token_words(tiny_tokenizer)
    examples = [
        Example("a", "The movie was a delight.", ("positive", "negative"), 0),  # multi-token choices
        Example("b", "Question: is the sky blue?", (one, two), 1),  # single-token: one pass
        Example("c", "Hi", ("yes", "no", "maybe not"), 2),
    ]
    scores = tasks.score_choices(ModelRunner(model), tiny_tokenizer, examples, max_tokens=40, progress=False)
    for ex, row in zip(examples, scores, strict=True):
        for choice, score in zip(ex.choices, row, strict=True):
            assert score == pytest.approx(_manual_score(model, tiny_tokenizer, ex, choice), rel=1e-4, abs=1e-4)
    normed = tasks.score_choices(ModelRunner(model), tiny_tokenizer, examples[:1], length_norm=True, progress=False)
    n_tokens = len(tasks.encode_answer(tiny_tokenizer, "positive"))
    assert normed[0][0] == pytest.approx(scores[0][0] / n_tokens, rel=1e-5)


def test_split_runner_equals_the_unsplit_model(lora_split, tiny_tokenizer):
    lora_split.model.eval()  # LoRA dropout off (``evaluate`` does this itself)
    examples, _ = tasks.get_task("rte").examples("validation", limit=4)
    unsplit = tasks.score_choices(ModelRunner(lora_split.model), tiny_tokenizer, examples, progress=False)
    split = tasks.score_choices(SplitRunner(lora_split), tiny_tokenizer, examples, progress=False)
    assert torch.allclose(torch.tensor(unsplit), torch.tensor(split), atol=1e-4)
    prompts = [tasks.encode_prompt(tiny_tokenizer, ex) for ex in examples[:3]]
    ids, lengths = tasks.pad_left(prompts, tiny_tokenizer.pad_token_id)
    a = ModelRunner(lora_split.model).generate(ids, lengths, 6, None, tiny_tokenizer.pad_token_id)
    b = SplitRunner(lora_split).generate(ids, lengths, 6, None, tiny_tokenizer.pad_token_id)
    assert a.shape == (3, 6) and torch.equal(a, b)


def test_generation_matches_one_sequence_at_a_time(lora_split, tiny_tokenizer):
    runner = ModelRunner(lora_split.model.eval())
    prompts = [
        tasks.encode_prompt(tiny_tokenizer, Example(str(i), p)) for i, p in enumerate(["Hi", "Summarize: a long day."])
    ]
    ids, lengths = tasks.pad_left(prompts, tiny_tokenizer.pad_token_id)
    batched = runner.generate(ids, lengths, 5, None, tiny_tokenizer.pad_token_id)
    for row, prompt in enumerate(prompts):
        alone = runner.generate(torch.tensor([prompt]), torch.tensor([len(prompt)]), 5, None, 0)
        assert torch.equal(batched[row], alone[0])


def test_evaluate_classification_result(lora_split, tiny_tokenizer):
    lora_split.model.train()
    result = tasks.evaluate("rte", lora_split, tiny_tokenizer, limit=6, progress=False, keep_predictions=True)
    assert lora_split.model.training  # the mode is restored
    assert (result.task, result.split, result.num_examples) == ("rte", "validation", 6)
    assert set(result.metrics) == {"accuracy"} and 0.0 <= result.metrics["accuracy"] <= 1.0
    preds = [p["prediction"] for p in result.predictions]
    gold = [p["gold"] for p in result.predictions]
    assert result.metrics["accuracy"] == pytest.approx(sum(p == g for p, g in zip(preds, gold, strict=True)) / 6)
    assert result.source.endswith("rte/val.jsonl")
    assert json.loads(json.dumps(result.to_dict()))["metrics"]["accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert "accuracy" in result.table()


def test_evaluate_generation_and_whole_groups(tiny_model, tiny_tokenizer):
    result = tasks.evaluate(
        "xsum", tiny_model, tiny_tokenizer, limit=2, max_new_tokens=3, progress=False, keep_predictions=True
    )
    assert result.split == "test" and set(result.metrics) == {"rouge1", "rouge2", "rougeL"}
    assert all(isinstance(p["prediction"], str) for p in result.predictions)
    multirc = tasks.evaluate("multirc", tiny_model, tiny_tokenizer, limit=2, progress=False)
    assert multirc.num_examples == 4  # the first question has 4 answer options
    assert set(multirc.metrics) == {"f1a", "em", "accuracy"}


def test_finetune_central_learns_a_toy_task(tiny_model, tiny_tokenizer):
    fruits, others = ["apple", "pear", "plum", "grape"], ["stone", "chair", "cloud", "river"]
    examples = [Example(w, f"Is {w} a fruit?", ("no", "yes"), int(w in fruits)) for w in fruits + others]
    before = tasks.evaluate("boolq", tiny_model, tiny_tokenizer, examples=examples, progress=False)
    torch.manual_seed(0)
    split = fedsea.split_model(tiny_model, 2, 2).add_lora(fedsea.LoraSpec(r=8, alpha=16, dropout=0.0))
    config = tasks.FinetuneConfig(steps=40, batch_size=8, lr=1e-2)
    result = tasks.finetune_central(split, tiny_tokenizer, "boolq", config, examples=examples, progress=False)
    assert result.steps == 40 and result.sequences == 320 and result.train_examples == 8
    assert result.last_loss < 0.6 * result.first_loss
    after = tasks.evaluate("boolq", tiny_model, tiny_tokenizer, examples=examples, progress=False)
    assert after.metrics["accuracy"] == 1.0 and before.metrics["accuracy"] < 1.0


def test_finetune_needs_adapters_and_fitting_examples(tiny_model, tiny_tokenizer):
    split = fedsea.split_model(tiny_model, 2, 2)
    with pytest.raises(fedsea.InvalidInputError, match="no LoRA adapters"):
        tasks.finetune_central(split, tiny_tokenizer, "rte")
    split.add_lora(fedsea.LoraSpec(r=2, alpha=4))
    with pytest.raises(fedsea.InvalidInputError, match="max_seq_len=4"):
        tasks.finetune_central(split, tiny_tokenizer, "rte", tasks.FinetuneConfig(max_seq_len=4), progress=False)


def test_training_batches_group_lengths_and_repeat():
    lengths = list(range(100))
    batches = tasks.finetune.training_batches(lengths, batch_size=4, seed=0, window=5)
    first_epoch = [next(batches) for _ in range(25)]
    assert sorted(i for b in first_epoch for i in b) == list(range(100))
    # within a window of 20, a batch spans at most ~20 lengths, not 100
    assert max(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first_epoch) < 40
    assert len(next(batches)) == 4  # endless


def test_cli_eval_unsplit_and_with_adapters(tmp_path, capsys, tiny_tokenizer):
    assert main(["eval", "--task", "rte", "--model", "tiny-llama", "--limit", "4", "--json", "--no-progress"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["num_examples"] == 4 and plain["partition"] is None and "accuracy" in plain["metrics"]

    model = fedsea.load_model("tiny-llama")
    split = fedsea.split_model(model, 1, 2).add_lora(fedsea.LoraSpec(r=2, alpha=4))
    randomize_lora(model, seed=5, scale=0.5)
    split.save_adapters(tmp_path / "adapters")
    expected = tasks.evaluate("copa", split, tiny_tokenizer, limit=8, progress=False)
    argv = ["eval", "--task", "copa", "--model", "tiny-llama", "--adapter", str(tmp_path / "adapters")]
    assert main([*argv, "--limit", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("model tiny-llama (split at (1, 2), adapters")
    result = json.loads(out[-1])
    assert result["partition"] == [1, 2] and result["metrics"] == pytest.approx(expected.metrics)
    assert main(["eval", "--task", "nope", "--model", "tiny-llama"]) == 2
