"""Speculative sampling keeps the output distribution (Leviathan et al. / Chen et al.), on the tiny model.

Exact distributions come from the unsplit model (its processed softmax); empirical ones from the
split's verification step (``_accept`` over real verification logits, thousands of seeded draws)
and from whole seeded speculative generations. Pearson's chi-square must stay under a bound that
a wrong acceptance rule exceeds by far (``test_a_wrong_rule_fails_the_same_check``).
Treating a model's drafts as point masses would not be wrong, only wasteful: it still gives p.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import fedsea
from fedsea.training import GenerationConfig, LocalStepper, SplitDecoder, generate
from fedsea.training.drafters import Draft, ModelDrafter
from fedsea.training.speculative import _accept
from tests.conftest import randomize_lora

PROMPT = [5, 17, 99, 230, 41, 7]
CONFIG = GenerationConfig(
    max_new_tokens=3, do_sample=True, temperature=0.7, top_k=3, eos_token_id=(), num_draft_tokens=2
)
DRAWS = 3000  # verification steps per drafter kind
RUNS = 240  # whole generations


def _split(seed: int, scale: float = 0.5) -> fedsea.SplitModel:
    model = fedsea.tiny_llama(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512)
    split = fedsea.split_model(model, 1, 1).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=seed, scale=scale)
    return split


def _draft_model() -> torch.nn.Module:
    """The target with a weaker adapter: q overlaps p without being it."""
    return _split(seed=2, scale=0.4).model


def _scores(prefix: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return CONFIG.processors()(prefix, logits)


@torch.no_grad()
def _dist(model: torch.nn.Module, seq: list[int]) -> torch.Tensor:
    """(V,) the processed next-token distribution of ``model`` after ``seq``."""
    ids = torch.tensor([seq])
    return torch.softmax(_scores(ids, model(input_ids=ids).logits[:, -1].float()), dim=-1)[0]


def chi2(counts: Counter, probs: dict[int, float], total: int) -> tuple[float, int]:
    """Pearson's statistic of ``counts`` against ``probs`` (cells of expected count < 5 pooled); df."""
    stat, df, rest_o, rest_e = 0.0, -1, total, float(total)
    for cell, p in probs.items():
        if p * total >= 5:
            stat += (counts[cell] - p * total) ** 2 / (p * total)
            df += 1
            rest_o -= counts[cell]
            rest_e -= p * total
    if rest_e >= 1:
        stat += (rest_o - rest_e) ** 2 / rest_e
        df += 1
    return stat, df


def bound(df: int) -> float:
    """Well above chi-square's 0.999 quantile for these df (df + 3.1 sqrt(2 df) + 6; 16.3 at df 3)."""
    return df + 3.1 * (2 * df) ** 0.5 + 6


def _verification_logits(
    split: fedsea.SplitModel, t1: int, drafts: list[list[int]]
) -> dict[tuple[int, ...], torch.Tensor]:
    """(3, V) tail logits after [t1, d1, d2] for each draft, through the split (rewound between drafts)."""
    decoder = SplitDecoder(split, LocalStepper(split.trunk), torch.tensor([PROMPT]), torch.tensor([len(PROMPT)]))
    decoder.logits()
    out = {}
    for draft in drafts:
        decoder.feed(torch.tensor([[t1, *draft]]))
        out[tuple(draft)] = decoder.logits(keep=3)[0]
        decoder.rewind(len(PROMPT))
    return out


def _check_two_tokens(draws: list[list[int]], exact_model: torch.nn.Module, t1: int) -> list[tuple[float, int]]:
    """Chi-square of the first token yielded, and of the second given the first (when yielded)."""
    prefix = [*PROMPT, t1]
    p1 = _dist(exact_model, prefix)
    checks = [
        chi2(Counter(d[0] for d in draws), {x: float(p1[x]) for x in p1.nonzero().flatten().tolist()}, len(draws))
    ]
    for x in {d[0] for d in draws if len(d) > 1}:
        seconds = [d[1] for d in draws if len(d) > 1 and d[0] == x]
        if len(seconds) >= 60:
            p2 = _dist(exact_model, [*prefix, x])
            checks.append(
                chi2(Counter(seconds), {y: float(p2[y]) for y in p2.nonzero().flatten().tolist()}, len(seconds))
            )
    return checks


def _draws(split, drafter_kind: str) -> tuple[list[list[int]], int]:
    target, draft_model = split.model, _draft_model()
    t1 = int(_dist(target, PROMPT).argmax())
    prefix = [*PROMPT, t1]
    gen = torch.Generator().manual_seed(0)
    if drafter_kind == "point-mass":  # the target's second choices: often rejected, sometimes kept
        d1 = int(_dist(target, prefix).topk(2).indices[1])
        d2 = int(_dist(target, [*prefix, d1]).topk(2).indices[1])
        logits = _verification_logits(split, t1, [[d1, d2]])[(d1, d2)]
        return [_accept(logits, Draft([d1, d2]), prefix, _scores, gen) for _ in range(DRAWS)], t1
    q1 = _dist(draft_model, prefix)
    support = q1.nonzero().flatten().tolist()
    q2 = {a: _dist(draft_model, [*prefix, a]) for a in support}
    pairs = [[a, b] for a in support for b in q2[a].nonzero().flatten().tolist()]
    logits = _verification_logits(split, t1, pairs)
    draws = []
    for _ in range(DRAWS):
        a = int(torch.multinomial(q1, 1, generator=gen))
        b = int(torch.multinomial(q2[a], 1, generator=gen))
        draws.append(_accept(logits[(a, b)], Draft([a, b], torch.stack([q1, q2[a]])), prefix, _scores, gen))
    return draws, t1


@pytest.mark.parametrize("kind", ["point-mass", "model"])
def test_the_acceptance_rule_keeps_the_distribution_of_two_tokens(kind):
    split = _split(seed=2)
    draws, t1 = _draws(split, kind)
    assert any(len(d) == 1 for d in draws) and any(len(d) == 3 for d in draws)  # rejections and full accepts
    checks = _check_two_tokens(draws, split.model, t1)
    assert len(checks) >= 2
    for stat, df in checks:
        assert df >= 1 and stat < bound(df), checks


def _forgetful_accept(logits, draft, prefix, scores, gen) -> list[int]:
    """A plausible bug, for the check's power: a rejected point-mass draft is drawn again from p
    (d_i not removed), so d_i comes out with p(d) + (1 - p(d)) p(d) instead of p(d)."""
    out = []
    for j, d in enumerate(draft.tokens):
        p = torch.softmax(scores(torch.tensor([prefix + out]), logits[j : j + 1].float())[0], dim=-1)
        if float(torch.rand((), generator=gen)) < float(p[d]):
            out.append(d)
            continue
        return [*out, int(torch.multinomial(p, 1, generator=gen))]
    return out


def test_a_wrong_rule_fails_the_same_check():
    split = _split(seed=2)
    t1 = int(_dist(split.model, PROMPT).argmax())
    prefix = [*PROMPT, t1]
    d1 = int(_dist(split.model, prefix).topk(2).indices[1])
    logits = _verification_logits(split, t1, [[d1]])[(d1,)]
    gen = torch.Generator().manual_seed(0)
    draws = [_forgetful_accept(logits, Draft([d1]), prefix, _scores, gen) for _ in range(DRAWS)]
    stat, df = _check_two_tokens(draws, split.model, t1)[0]
    assert stat > 3 * bound(df), (stat, df)


def test_whole_speculative_generations_sample_like_plain_sampling():
    split, drafter = _split(seed=2), ModelDrafter(_draft_model(), 512)
    ids, lengths = torch.tensor([PROMPT]), torch.tensor([len(PROMPT)])
    pairs: Counter = Counter()
    for seed in range(RUNS):
        config = GenerationConfig(**{**CONFIG.__dict__, "seed": seed, "speculative": drafter})
        out = generate(split, LocalStepper(split.trunk), ids, lengths, config).token_ids[0]
        pairs[tuple(out[:2])] += 1
    p1 = _dist(split.model, PROMPT)
    exact = {}
    for a in p1.nonzero().flatten().tolist():
        p2 = _dist(split.model, [*PROMPT, a])
        exact.update({(a, b): float(p1[a] * p2[b]) for b in p2.nonzero().flatten().tolist()})
    stat, df = chi2(pairs, exact, RUNS)
    assert df >= 3 and stat < bound(df), (stat, df, pairs)
