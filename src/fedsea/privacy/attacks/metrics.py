"""How much of the victim's text an attack recovered.

- token accuracy: share of the victim's real tokens whose id the attack got right;
- ROUGE-L F: between the decoded recovered text and the decoded true text (rouge-score,
  Porter stemmer), averaged over sequences, as in the seed paper's attack figures;
- exact: share of sequences recovered token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import cast

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedsea.privacy.attacks.data import HiddenSet


@dataclass(frozen=True)
class AttackScores:
    """Recovery of one attack on one victim set.

    Attributes:
        token_accuracy: share of real tokens recovered, in [0, 1].
        rouge_l: mean ROUGE-L F-measure of the recovered texts, in [0, 1].
        exact: share of sequences recovered exactly, in [0, 1].
        tokens: number of real tokens scored.
        sequences: number of sequences scored.
    """

    token_accuracy: float
    rouge_l: float
    exact: float
    tokens: int
    sequences: int

    def to_dict(self) -> dict[str, float | int]:
        """The scores as a plain dict (JSON-able)."""
        return asdict(self)


def _real(ids: torch.Tensor, length: int) -> list[int]:
    return ids[ids.shape[0] - length :].tolist()


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, Porter stemmer); 1.0 for two empty texts."""
    from rouge_score import rouge_scorer  # imported here: only the attack suite needs it

    if len(predictions) != len(references):
        raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) differ in length")
    if not predictions:
        raise ValueError("need at least one text to score")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = 0.0
    for pred, ref in zip(predictions, references, strict=True):
        if not ref.strip() and not pred.strip():
            total += 1.0
            continue
        total += scorer.score(ref, pred)["rougeL"].fmeasure
    return total / len(predictions)


def score(predicted: torch.Tensor, victim: HiddenSet, tokenizer: PreTrainedTokenizerBase) -> AttackScores:
    """Compare recovered token ids with the victim's.

    Args:
        predicted: (B, n) token ids, aligned with ``victim.input_ids`` (padding slots ignored).
        victim: the victim's sequences.
        tokenizer: to decode both for ROUGE-L.
    """
    if predicted.shape != victim.input_ids.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} != victim ids {tuple(victim.input_ids.shape)}")
    mask = victim.mask  # (B, n)
    hits = (predicted.cpu() == victim.input_ids) & mask
    per_seq_hits = hits.sum(dim=1)  # (B,)
    preds, refs = [], []
    for b in range(len(victim)):
        length = int(victim.lengths[b])
        # One sequence decodes to one str (the stub's list[str] is for a batch).
        preds.append(cast(str, tokenizer.decode(_real(predicted[b].cpu(), length))))
        refs.append(cast(str, tokenizer.decode(_real(victim.input_ids[b], length))))
    return AttackScores(
        token_accuracy=float(hits.sum()) / max(victim.num_tokens, 1),
        rouge_l=rouge_l(preds, refs),
        exact=float((per_seq_hits == victim.lengths).float().mean()),
        tokens=victim.num_tokens,
        sequences=len(victim),
    )
