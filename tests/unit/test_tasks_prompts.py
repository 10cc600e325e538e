"""Prompt building: the chat template when the tokenizer has one, a plain format otherwise."""

from __future__ import annotations

import copy

import pytest

from fedsea import tasks
from fedsea.tasks.base import Example
from fedsea.tasks.prompts import answer_text, end_ids, end_of_turn, stop_token_id, uses_chat_template

EXAMPLE = Example("1", "Review: a delight.\n\nPositive or negative?", ("negative", "positive"), 1)


@pytest.fixture
def plain_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    return tok


def test_chat_template_wraps_the_prompt(tiny_tokenizer):
    assert uses_chat_template(tiny_tokenizer)
    text = tasks.render_prompt(tiny_tokenizer, EXAMPLE.prompt)
    assert text == f"<|im_start|>user\n{EXAMPLE.prompt}<|im_end|>\n<|im_start|>assistant\n"
    with_system = tasks.render_prompt(tiny_tokenizer, "Hi", system="Be brief.")
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    assert end_of_turn(tiny_tokenizer) == "<|im_end|>"
    assert stop_token_id(tiny_tokenizer) == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_training_ids_equal_the_rendered_conversation(tiny_tokenizer):
    ids, start = tasks.encode_for_training(tiny_tokenizer, EXAMPLE)
    conversation = [
        {"role": "user", "content": EXAMPLE.prompt},
        {"role": "assistant", "content": "positive"},
    ]
    full = tiny_tokenizer.apply_chat_template(conversation, tokenize=False)
    full_ids = tiny_tokenizer(full.rstrip("\n"), add_special_tokens=False)["input_ids"]
    assert ids == full_ids
    assert ids[:start] == tasks.encode_prompt(tiny_tokenizer, EXAMPLE)
    assert tiny_tokenizer.decode(ids[start:]) == "positive<|im_end|>"
    assert ids[start:] == tasks.encode_answer(tiny_tokenizer, "positive") + end_ids(tiny_tokenizer)


def test_plain_format_without_a_template(plain_tokenizer):
    assert not uses_chat_template(plain_tokenizer)
    assert tasks.render_prompt(plain_tokenizer, "2 + 2 =") == "2 + 2 =\nAnswer:"
    assert answer_text(plain_tokenizer, "4") == " 4"
    ids, start = tasks.encode_for_training(plain_tokenizer, Example("x", "2 + 2 =", references=("4",)))
    assert plain_tokenizer.decode(ids[:start]) == "2 + 2 =\nAnswer:"
    assert plain_tokenizer.decode(ids[start:]) == " 4" + plain_tokenizer.eos_token


def test_text_rows_are_plain_language_modelling(tiny_tokenizer):
    ex = Example("t", "", references=("The council approved a new park.",))
    ids, start = tasks.encode_for_training(tiny_tokenizer, ex)
    assert start == 0 and tasks.encode_prompt(tiny_tokenizer, ex) == []
    assert tiny_tokenizer.decode(ids) == "The council approved a new park." + tiny_tokenizer.eos_token


@pytest.mark.parametrize("name", ["sst2", "boolq", "rte", "cb", "copa", "wic", "wsc", "multirc", "record", "xsum"])
def test_every_task_builds_prompts_and_targets(name, tiny_tokenizer):
    task = tasks.get_task(name)
    for ex in task.examples(split="train" if name != "xsum" else "test", limit=3)[0]:
        ids, start = tasks.encode_for_training(tiny_tokenizer, ex)
        assert 0 < start < len(ids)
        assert tiny_tokenizer.decode(ids[start:]) == ex.target + "<|im_end|>"
        assert ex.prompt in tasks.render_prompt(tiny_tokenizer, ex.prompt)


def test_task_prompts_mention_their_inputs():
    rte = tasks.get_task("rte").examples("validation", limit=1)[0][0]
    assert rte.prompt.startswith("Dana Reeve, the widow") and '"Christopher Reeve had an accident."' in rte.prompt
    assert rte.choices == ("Yes", "No") and rte.target == "No"
    wic = tasks.get_task("wic").examples("validation", limit=1)[0][0]
    assert '"class"' in wic.prompt and "An emerging professional class." in wic.prompt
    quac = tasks.get_task("quac").examples("validation", limit=1)[0][0]
    assert quac.prompt.rstrip().endswith("if the text does not say.") and "\n\nQuestion: " in quac.prompt
