"""Each metric on cases worked out by hand."""

from __future__ import annotations

import pytest

from fedsea.errors import InvalidInputError
from fedsea.tasks import metrics


def test_accuracy_and_macro_f1():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(2 / 4)
    # class 0: tp=1 fp=1 fn=0 -> 2/3; class 1: tp=1 fp=0 fn=1 -> 2/3; class 2: tp=1 -> 1
    preds, labels = [0, 0, 1, 2], [0, 1, 1, 2]
    assert metrics.macro_f1(preds, labels, 3) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    with pytest.raises(InvalidInputError, match="2 predictions for 3"):
        metrics.accuracy([1, 0], [1, 0, 1])


def test_multirc_f1a_and_em():
    # Question a: options (1,1), (0,0) -> all right. Question b: (1,0), (0,1), (1,1) -> wrong.
    preds = [1, 0, 1, 0, 1]
    labels = [1, 0, 0, 1, 1]
    groups = ["a", "a", "b", "b", "b"]
    # Positive class over all options: tp = 2, fp = 1, fn = 1 -> F1a = 4 / (4 + 1 + 1).
    scores = metrics.multirc_scores(preds, labels, groups)
    assert scores == {"f1a": pytest.approx(4 / 6), "em": pytest.approx(1 / 2)}
    assert metrics.binary_f1([0, 0], [0, 0]) == 0.0  # nothing to count


def test_normalization_drops_case_punctuation_and_articles():
    assert metrics.normalize_answer("The  Quick, brown FOX!") == "quick brown fox"
    assert metrics.normalize_answer("an apple a day") == "apple day"
    assert metrics.normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_and_token_f1():
    assert metrics.exact_match("The Eiffel Tower.", ["eiffel tower", "the tower"]) == 1.0
    assert metrics.exact_match("Eiffel", ["eiffel tower"]) == 0.0
    # pred "in may 1983" vs gold "may 1983 she married": common 2, P = 2/3, R = 2/4 -> F1 = 4/7
    assert metrics.token_f1("In May 1983", ["May 1983, she married"]) == pytest.approx(4 / 7)
    # the best reference counts
    assert metrics.token_f1("blue", ["red", "Blue."]) == 1.0
    # CoQA's rule for empty answers: both empty agree, one empty does not
    assert metrics.token_f1("the", ["a"]) == 1.0
    assert metrics.token_f1("", ["something"]) == 0.0
    # repeated tokens are counted with their multiplicity: common = min(2, 1) = 1
    assert metrics.token_f1("yes yes", ["yes"]) == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_qa_scores_average_over_examples():
    scores = metrics.qa_scores(["Paris", "London bridge"], [["paris"], ["London"]])
    assert scores["em"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx((1.0 + 2 / 3) / 2)  # P = 1/2, R = 1 -> 2/3


def test_rouge_against_hand_counts():
    # ref "the cat sat on the mat" (6 tokens), pred "the cat was on the mat" (6 tokens):
    # unigrams in common 5 -> R1 = 5/6; bigrams: the-cat, on-the, the-mat = 3 of 5 -> R2 = 3/5;
    # LCS "the cat on the mat" = 5 -> RL = 5/6.
    scores = metrics.rouge_scores(["the cat was on the mat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(5 / 6)
    assert scores["rouge2"] == pytest.approx(3 / 5)
    assert scores["rougeL"] == pytest.approx(5 / 6)
    # stemming: "cats" ~ "cat"; several references: the best counts; mean over examples
    two = metrics.rouge_scores(["cats", "dog"], [["cat"], ["bird", "dog"]])
    assert two["rouge1"] == pytest.approx(1.0)
    zero = metrics.rouge_scores(["completely different"], ["the cat sat"])
    assert zero == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
