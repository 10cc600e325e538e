"""Split speculative decoding: several tokens per round trip to the trunk.

Plain split generation pays one network round trip per token. Here the client's drafter
(``fedsea.training.drafters``) proposes k tokens d_1..d_k; the loop feeds [last, d_1..d_k]
through the head, sends their k + 1 hidden states to the trunk in ONE ``stepper.step`` (one
round trip), scores the k + 1 positions with the tail, keeps the longest prefix of the draft
the model agrees with plus one token of its own, and rewinds the three KV caches (head and tail
here, the trunk's through ``stepper.rewind``: one message, no round trip) to the kept length.

Acceptance:
- greedy: d_i is kept while it is the argmax of the processed logits at its position; the output
  is then token-identical to plain split generation (and to Hugging Face ``generate``).
- sampling: the speculative acceptance rule of Leviathan et al. (2023) and Chen et al. (2023),
  which keeps the output distribution exactly that of plain sampling: d_i is kept with
  probability min(1, p(d_i) / q(d_i)); on rejection the token is drawn from the residual
  max(0, p - q), normalized. For a deterministic drafter (q a point mass on d_i) that is: keep
  with probability p(d_i), else draw from p with d_i removed. When every draft is kept, the bonus
  token is drawn from p at the last position. p is the distribution after the generation's
  processors (repetition penalty, temperature, top-k, top-p), each applied per position with that
  position's own prefix. The same ``seed`` gives reproducible output, but not the tokens of plain
  sampling with that seed (the random draws are used differently); the distribution is the same.

Privacy: the head's output for draft tokens goes through ``privatize`` (the noise on h_p) exactly
as any other state (``SplitDecoder`` applies it to everything it sends). A rejected draft is never
resent: after the rewind the next step starts from the model's own token, a different token (the
residual gives a rejected d_i probability 0), hence a different state; a server resume replays
the bytes sent before, noise included (``RemoteStepper``).

Draft length: at most k (``GenerationConfig.num_draft_tokens``); it starts at k, drops by one
after each draft with a rejected token and grows by two (up to k) after a fully kept one
(transformers' "heuristic" schedule): a verification step costs more the more tokens it carries,
so drafts that keep missing are cut short. Any rule that looks only at the past keeps greedy
output identical and the sampling distribution exact.

Limits: batch 1 (rows of a batch accept different counts; ``ValueError`` otherwise); KV caches on
(``use_cache=False`` is refused); k draft tokens per step (``GenerationConfig.num_draft_tokens``),
never more than the tokens left to ``max_new_tokens`` minus one, so the stream's ``max_length``
(prompt + ``max_new_tokens``) always holds the verification step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, cast

import torch

from fedsea.model.split import SplitModel
from fedsea.training.decoder import SplitDecoder
from fedsea.training.drafters import Draft, make_drafter
from fedsea.training.generation_config import GenerationStep, first_stop
from fedsea.training.stepper import TrunkStepper

if TYPE_CHECKING:
    from fedsea.training.generation import GenerationConfig, Privatize


def check_speculative(config: GenerationConfig, batch: int) -> None:
    """Refuse what the speculative path does not support, with a clear ``ValueError``."""
    if batch != 1:
        raise ValueError(f"speculative decoding generates one prompt at a time (batch 1), got a batch of {batch}")
    if not config.use_cache:
        raise ValueError("speculative decoding needs the KV caches (use_cache=True): it rewinds them")


def _accept(
    logits: torch.Tensor,
    draft: Draft,
    ids: list[int],
    scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    generator: torch.Generator | None,
) -> list[int]:
    """The tokens this verification step yields: the kept drafts, then one token of the model's.

    Args:
        logits: (m + 1, V) the tail's logits after [last, d_1..d_m]: row j predicts the token
            after ``ids`` + d_1..d_j.
        draft: the m proposed tokens (and q, for a sampling model drafter).
        ids: the prompt's real tokens and every token generated (``last`` included).
        scores: the generation's processors, ``(prefix (1, T), logits (1, V)) -> (1, V)``; None
            when there are none (greedy decoding without repetition penalty).
        generator: the sampling generator; None for greedy decoding.
    """
    device = logits.device
    out: list[int] = []
    m = len(draft.tokens)
    if scores is None:  # greedy without processors: every position's argmax in one host sync
        for j, token in enumerate(logits.argmax(dim=-1).tolist()):
            out.append(token)
            if j == m or token != draft.tokens[j]:
                return out
    for j in range(m + 1):
        assert scores is not None
        prefix = torch.tensor([ids + draft.tokens[:j]], dtype=torch.int64, device=device)  # (1, T + j)
        processed = scores(prefix, logits[j : j + 1].float())  # (1, V)
        if generator is None:
            token = int(processed.argmax(dim=-1))
            out.append(token)
            if j == m or token != draft.tokens[j]:
                return out
            continue
        p = torch.softmax(processed[0], dim=-1)  # (V,)
        if j == m:  # every draft kept: the bonus token is drawn from p
            out.append(int(torch.multinomial(p, 1, generator=generator)))
            return out
        d = draft.tokens[j]
        q = draft.probs[j].to(device) if draft.probs is not None else None  # (V,) or a point mass on d
        q_d = float(q[d]) if q is not None else 1.0
        u = float(torch.rand((), generator=generator, device=device))
        if u * q_d < float(p[d]):  # kept with probability min(1, p(d) / q(d))
            out.append(d)
            continue
        if q is not None:
            residual = torch.clamp(p - q, min=0.0)
        else:
            residual = p.clone()
            residual[d] = 0.0
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: rejection had probability ~0
            residual = p
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    raise AssertionError("unreachable: the last position always returns")


@torch.no_grad()
def speculative_steps(
    split: SplitModel,
    stepper: TrunkStepper,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    config: GenerationConfig,
    decode: Callable[[list[int]], str] | None = None,
    privatize: Privatize | None = None,
) -> Iterator[GenerationStep]:
    """Yield one ``GenerationStep`` per new token, as ``generate_steps`` does, several per round trip.

    Args:
        input_ids: (1, n) the prompt (left padding allowed); lengths: (1,) its real length.
        config: ``speculative`` names the drafter (see ``fedsea.training.drafters.make_drafter``),
            ``num_draft_tokens`` is k, ``prompt_lookup_ngram`` and ``prompt_lookup_min_ngram``
            prompt lookup's longest and shortest n.
        decode: ``ids -> text``, for stop strings.
        privatize: the noise on h_p, applied to every state sent, drafts included.
    """
    check_speculative(config, int(input_ids.shape[0]))
    if config.stop and decode is None:
        raise ValueError("stop strings need a tokenizer to decode the text")
    device = input_ids.device
    decoder = SplitDecoder(split, stepper, input_ids, lengths, True, privatize)
    try:
        vocab = int(split.tail.lm_head.weight.shape[0])
        drafter = make_drafter(
            config.speculative, vocab, config.prompt_lookup_ngram, device, split, config.prompt_lookup_min_ngram
        )
        attach = getattr(drafter, "attach", None)
        if attach is not None:  # a drafter that builds on the decoder's caches (the bridge drafter)
            attach(decoder)
        processors = config.processors()

        def scores(prefix: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            return processors(cast(torch.LongTensor, prefix), logits)

        generator: torch.Generator | None = None
        if config.do_sample:
            generator = torch.Generator(device=device)
            if config.seed is not None:
                generator.manual_seed(config.seed)
        eos = set(config.eos_token_id or ())
        real = int(lengths[0])
        ids: list[int] = input_ids[0, input_ids.shape[1] - real :].tolist()  # the prompt's real tokens
        generated: list[int] = []
        draft = Draft([])
        k = config.draft_tokens()
        width = k  # drafts asked for: shrinks while they miss, grows back as they hit
        logits = decoder.logits()[0]  # (1, V): the prefill's last position
        while True:
            new = _accept(logits, draft, ids, scores if processors or generator is not None else None, generator)
            for token in new:
                ids.append(token)
                generated.append(token)
                done = token in eos
                if config.stop and not done and decode is not None:
                    done = first_stop(decode(generated), config.stop) >= 0
                # As in ``generate_steps``: finished means EOS or a stop string, not the length cap.
                yield GenerationStep(len(generated) - 1, {0: token}, (0,) if done else ())
                if done or len(generated) == config.max_new_tokens:
                    return
            rejected = len(draft.tokens) - (len(new) - 1)
            if rejected:  # the caches hold [last, d_1..d_m]; keep [last, d_1..d_accepted]
                decoder.rewind(decoder.length - rejected)
            if draft.tokens:  # transformers' "heuristic" schedule, capped at k: +2 if all kept, else -1
                width = min(k, width + 2) if not rejected else max(1, width - 1)
            # m + 1 tokens come back at most: never past max_new_tokens (nor the stream's max_length).
            room = min(width, config.max_new_tokens - len(generated) - 1)
            draft = drafter.propose(ids, room, scores, generator) if room > 0 else Draft([])
            draft = Draft(draft.tokens[:room], draft.probs[:room] if draft.probs is not None else None)
            fed = torch.tensor([[new[-1], *draft.tokens]], dtype=torch.int64).to(device, non_blocking=True)
            decoder.feed(fed)  # (1, m + 1)
            logits = decoder.logits(keep=len(draft.tokens) + 1)[0]  # (m + 1, V)
    finally:
        decoder.close()
