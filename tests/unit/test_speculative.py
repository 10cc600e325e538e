"""Split speculative decoding in process: greedy exactness, drafters, limits, and what the trunk is sent."""

from __future__ import annotations

import pytest
import torch

import fedsea
from fedsea.training import CutTraffic, GenerationConfig, LocalStepper, generate
from fedsea.training.drafters import ModelDrafter, PromptLookupDrafter
from tests.conftest import randomize_lora

TINY = {"num_layers": 6, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 512}
PROMPTS = ["The movie was a delight from start to finish, a delight", "Question: is the sky blue on a clear day?"]


def _split(seed: int = 1, scale: float = 0.2) -> fedsea.SplitModel:
    split = fedsea.split_model(fedsea.tiny_llama(**TINY), 2, 1).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=seed, scale=scale)
    return split


def _run(split, tokenizer, prompt, traffic=None, **kw):
    enc = tokenizer([prompt], return_tensors="pt")
    stepper = LocalStepper(split.trunk, traffic=traffic)
    return generate(split, stepper, enc["input_ids"], enc["attention_mask"].sum(1), GenerationConfig(**kw), tokenizer)


def _hf(model, tokenizer, prompt, new, **kw):
    enc = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id, **kw)
    return out[0, enc["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculative_equals_plain_split_and_hf_generate(tiny_tokenizer, prompt):
    split = _split()
    plain = _run(split, tiny_tokenizer, prompt, max_new_tokens=24, eos_token_id=())
    assert plain.token_ids[0] == _hf(split.model, tiny_tokenizer, prompt, 24, eos_token_id=None)
    drafters = {"prompt-lookup": "prompt-lookup", "model": ModelDrafter(_split(seed=7, scale=0.3).model, 512)}
    for name, drafter in drafters.items():
        for k in (1, 4):
            traffic = CutTraffic()
            spec = _run(
                split,
                tiny_tokenizer,
                prompt,
                traffic,
                max_new_tokens=24,
                eos_token_id=(),
                speculative=drafter,
                num_draft_tokens=k,
            )
            assert spec.token_ids == plain.token_ids, (name, k)
            assert traffic.messages // 2 <= 24, (name, k)  # never more round trips than plain
    # A draft model that is the target itself: every draft kept, k + 1 tokens per round trip.
    traffic = CutTraffic()
    spec = _run(
        split,
        tiny_tokenizer,
        prompt,
        traffic,
        max_new_tokens=24,
        eos_token_id=(),
        speculative=ModelDrafter(split.model, 512),
        num_draft_tokens=4,
    )
    assert spec.token_ids == plain.token_ids
    assert traffic.messages // 2 == 1 + (23 + 4) // 5  # the prefill, then 5 tokens a step


def test_prompt_lookup_gives_several_tokens_per_round_trip(tiny_tokenizer):
    split = _split(seed=3, scale=0.05)  # this one repeats itself: lookups hit
    prompt = PROMPTS[0]
    plain = _run(split, tiny_tokenizer, prompt, max_new_tokens=30, eos_token_id=())
    traffic = CutTraffic()
    spec = _run(split, tiny_tokenizer, prompt, traffic, max_new_tokens=30, eos_token_id=(), speculative="prompt-lookup")
    assert spec.token_ids == plain.token_ids
    steps = traffic.messages // 2
    assert 30 / steps >= 2, steps
    assert max(traffic.per_step[1:]) > min(traffic.per_step[1:])  # drafts of several tokens went up


def test_eos_stop_strings_and_repetition_penalty_match_plain(tiny_tokenizer):
    split = _split()
    prompt = PROMPTS[0]
    base = _run(split, tiny_tokenizer, prompt, max_new_tokens=24, eos_token_id=(), repetition_penalty=1.3)
    assert base.token_ids[0] == _hf(split.model, tiny_tokenizer, prompt, 24, eos_token_id=None, repetition_penalty=1.3)
    eos = base.token_ids[0][9]  # a token produced mid-way ends the text there
    text = base.texts[0]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    drafter = ModelDrafter(_split(seed=7, scale=0.3).model, 512)
    for kw in (
        {"eos_token_id": (eos,)},
        {"eos_token_id": (), "stop": (stop,)},
        {"eos_token_id": (), "max_new_tokens": 7},
    ):
        settings = {"max_new_tokens": 24, "repetition_penalty": 1.3, **kw}
        plain = _run(split, tiny_tokenizer, prompt, **settings)
        for speculative in ("prompt-lookup", drafter):
            spec = _run(split, tiny_tokenizer, prompt, speculative=speculative, **settings)
            assert (spec.token_ids, spec.texts, spec.finish_reasons) == (
                plain.token_ids,
                plain.texts,
                plain.finish_reasons,
            ), kw


def test_unsupported_settings_are_refused_clearly(tiny_tokenizer):
    split = _split()
    enc = tiny_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="batch 1"):
        generate(
            split,
            LocalStepper(split.trunk),
            enc["input_ids"],
            enc["attention_mask"].sum(1),
            GenerationConfig(speculative="prompt-lookup"),
        )
    with pytest.raises(ValueError, match="use_cache"):
        _run(split, tiny_tokenizer, PROMPTS[0], speculative="prompt-lookup", use_cache=False)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        GenerationConfig(speculative="prompt-lookup", num_draft_tokens=0)
    with pytest.raises(ValueError, match="speculative must be"):
        _run(split, tiny_tokenizer, PROMPTS[0], speculative=3)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    drafter = PromptLookupDrafter(ngram=2, min_ngram=1)

    def propose(ids, k=3, lookup=drafter):
        return lookup.propose(ids, k, lambda p, s: s, None).tokens

    assert propose([1, 2, 3, 4, 9, 1, 2, 5, 6, 7, 8, 1, 2]) == [5, 6, 7]  # the latest "1 2"
    assert propose([3, 3, 3, 3, 3]) == [3, 3, 3]  # the longest continuation, not the one just behind
    assert propose([4, 5, 6, 9, 5]) == [6]  # no bigram match: the unigram "5", one token only
    assert propose([1, 2, 3, 1, 2], k=5) == [3, 1, 2]  # cut at the end of the text
    assert propose([1, 2, 3]) == []  # nothing to copy
    assert propose([7, 7], k=0) == []
    # A shorter match than min_ngram proposes nothing; the default drafts on a full trigram only.
    bigram = PromptLookupDrafter(ngram=3, min_ngram=2)
    assert propose([4, 5, 6, 9, 5], lookup=bigram) == []
    assert propose([4, 5, 6, 9, 4, 5], lookup=bigram) == [6, 9]  # a bigram match: at most 2 tokens
    default = PromptLookupDrafter()
    assert propose([4, 5, 6, 9, 4, 5], lookup=default) == []
    assert propose([1, 2, 3, 7, 1, 2, 3], lookup=default) == [7, 1, 2]  # the full trigram: up to k
    with pytest.raises(ValueError, match="prompt_lookup_min_ngram"):
        PromptLookupDrafter(ngram=2, min_ngram=3)


class RecordingStepper(LocalStepper):
    """The real in-process trunk, recording each slot it is sent: (position, state sent)."""

    def __init__(self, trunk) -> None:
        super().__init__(trunk)
        self.sent: list[torch.Tensor] = []
        self.slots: list[int] = []  # the absolute position of each vector sent, in order
        self.rewinds: list[int] = []

    def step(self, step, hidden, lengths, keep_rows):
        start = self.cache.get_seq_length(self.trunk.start)
        self.sent.append(hidden.clone())
        self.slots.extend(range(start, start + hidden.shape[1]))
        return super().step(step, hidden, lengths, keep_rows)

    def rewind(self, length: int) -> None:
        self.rewinds.append(length)
        super().rewind(length)


def test_noise_covers_draft_states_and_rejected_drafts_are_never_resent(tiny_tokenizer):
    split = _split()
    gen = torch.Generator().manual_seed(0)
    clean: list[torch.Tensor] = []
    noised: list[torch.Tensor] = []

    def privatize(h: torch.Tensor) -> torch.Tensor:  # (1, n, d) -> the same, noised
        clean.append(h.clone())
        noised.append(h + 0.05 * torch.randn(h.shape, generator=gen))
        return noised[-1]

    enc = tiny_tokenizer([PROMPTS[0]], return_tensors="pt")
    stepper = RecordingStepper(split.trunk)
    drafter = ModelDrafter(_split(seed=7, scale=0.3).model, 512)
    config = GenerationConfig(max_new_tokens=24, eos_token_id=(), speculative=drafter, num_draft_tokens=4)
    out = generate(split, stepper, enc["input_ids"], enc["attention_mask"].sum(1), config, privatize=privatize)
    assert len(out.token_ids[0]) == 24
    # Every state that reached the trunk, drafts included, is the noised one, each noised once.
    assert len(stepper.sent) == len(noised) and all(
        torch.equal(a, b) for a, b in zip(stepper.sent, noised, strict=True)
    )
    assert any(h.shape[1] > 1 for h in stepper.sent[1:]) and stepper.rewinds  # drafts went up; some were rejected
    # A slot is sent again only after a rewind, and then for a different token: never the same
    # clean state (a rejected draft resent with fresh noise would repeat one).
    vectors = torch.cat([h[0] for h in clean])  # (slots sent, d)
    seen: dict[int, list[torch.Tensor]] = {}
    for slot, vector in zip(stepper.slots, vectors, strict=True):
        assert not any(torch.allclose(vector, old) for old in seen.get(slot, [])), slot
        seen.setdefault(slot, []).append(vector)
    assert any(len(v) > 1 for v in seen.values())  # slots were reused after rewinds
