"""Metrics, each a plain function of predictions and references, every value in [0, 1].

- accuracy and macro-F1 (CB reports both);
- MultiRC: F1a (binary F1 over all answer options) and EM (a question counts when every one
  of its options is labelled right), as in SuperGLUE;
- extractive / conversational QA (SQuAD, CoQA, QuAC, and ReCoRD, whose official script is
  SQuAD's): exact match and token F1 after the official normalization (lowercase, drop
  punctuation, drop the articles a/an/the, collapse whitespace), maximum over the references;
- ROUGE-1/2/L F-measure through the ``rouge-score`` package (Porter stemming, as in the
  XSum literature), the best reference when there are several.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Hashable, Sequence

from fedsea.errors import InvalidInputError

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)
ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")


def _same_length(name: str, a: Sequence[object], b: Sequence[object]) -> None:
    if len(a) != len(b):
        raise InvalidInputError(name, f"{len(a)} predictions for {len(b)} references")
    if not a:
        raise InvalidInputError(name, "no predictions to score")


def accuracy(predictions: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """Share of ``predictions`` equal to ``labels``."""
    _same_length("accuracy", predictions, labels)
    return sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)


def binary_f1(predictions: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the ``positive`` class: 2 tp / (2 tp + fp + fn); 0 when there is nothing to count."""
    _same_length("f1", predictions, labels)
    tp = sum(p == positive and y == positive for p, y in zip(predictions, labels, strict=True))
    fp = sum(p == positive and y != positive for p, y in zip(predictions, labels, strict=True))
    fn = sum(p != positive and y == positive for p, y in zip(predictions, labels, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def macro_f1(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    """Unweighted mean over classes ``0 .. num_classes-1`` of each class's F1."""
    return sum(binary_f1(predictions, labels, positive=c) for c in range(num_classes)) / num_classes


def multirc_scores(predictions: Sequence[int], labels: Sequence[int], groups: Sequence[str]) -> dict[str, float]:
    """MultiRC's F1a and EM.

    Args:
        predictions, labels: 0/1 per answer option.
        groups: the question each option belongs to.
    """
    _same_length("multirc", predictions, labels)
    _same_length("multirc", groups, labels)
    per_question: dict[str, bool] = {}
    for p, y, g in zip(predictions, labels, groups, strict=True):
        per_question[g] = per_question.get(g, True) and p == y
    return {
        "f1a": binary_f1(predictions, labels, positive=1),
        "em": sum(per_question.values()) / len(per_question),
    }


def normalize_answer(text: str) -> str:
    """The SQuAD / CoQA normalization: lowercase, drop punctuation and articles, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1_one(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        # CoQA's rule: two empty answers agree, an empty and a non-empty one do not.
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals some normalized reference, else 0.0."""
    if not references:
        raise InvalidInputError("references", "need at least one reference answer")
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """The best bag-of-tokens F1 of ``prediction`` against any of ``references``."""
    if not references:
        raise InvalidInputError("references", "need at least one reference answer")
    return max(_f1_one(prediction, r) for r in references)


def qa_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and token F1 (SQuAD, CoQA, QuAC, ReCoRD)."""
    _same_length("qa", predictions, references)
    n = len(predictions)
    return {
        "em": sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / n,
        "f1": sum(token_f1(p, r) for p, r in zip(predictions, references, strict=True)) / n,
    }


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measure (rouge-score, Porter stemmer).

    Args:
        predictions: one generated text each.
        references: one reference each, or several (the best one by each measure counts).
    """
    from rouge_score import rouge_scorer  # imported here: only summarization needs it

    _same_length("rouge", predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references, strict=True):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise InvalidInputError("references", "need at least one reference text")
        for kind in ROUGE_TYPES:
            totals[kind] += max(scorer.score(r, prediction)[kind].fmeasure for r in refs)
    return {kind: total / len(predictions) for kind, total in totals.items()}
