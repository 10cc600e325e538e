"""The generation loop: one for every split generation, over a stepper that hides where the trunk is.

The semantics follow Hugging Face ``generate``: greedy or sampling (temperature, top-k,
top-p, seed), ``max_new_tokens``, EOS and stop strings, repetition penalty, a batch of
prompts of different lengths (left padding), streaming. Logits processing reuses
transformers' own processors, so that greedy split generation is token-identical to
``model.generate`` on the unsplit model (the reference, which generates the unsplit model).

Design decisions:
- The loop is network-free: the trunk is reached through a ``TrunkStepper``
  (``fedsea.training.stepper.LocalStepper`` in process, ``fedsea.client``'s ``RemoteStepper``
  over one gRPC stream), the head and tail through a ``SplitDecoder``. After the prefill, each
  step moves one hidden vector per running row each way.
- The noise on h_p is the loop's (``privatize``), not the model's: the same split serves a
  clean and a noised evaluation, and a deployed client noises every release the same way.
- Finished rows are dropped from the batch (``keep_rows``, sent once when it changes), so
  they stop costing compute and bytes on both sides.
- ``use_cache=False`` is the naive baseline (the whole sequence recomputed and resent at every
  token, as FL-GLM did), kept for benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

import torch

from fedsea.model.split import SplitModel
from fedsea.training.decoder import SplitDecoder
from fedsea.training.generation_config import GenerationConfig as GenerationConfig
from fedsea.training.generation_config import GenerationStep as GenerationStep
from fedsea.training.generation_config import first_stop
from fedsea.training.stepper import CutTraffic, LocalStepper, TrunkStepper

Privatize = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class GenerationOutput:
    """Per prompt: new token ids, decoded text (cut before a stop string) and why it ended."""

    token_ids: list[list[int]]
    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)  # "eos", "stop" or "length"


@torch.no_grad()
def generate_steps(
    split: SplitModel,
    stepper: TrunkStepper,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    config: GenerationConfig,
    decode: Callable[[list[int]], str] | None = None,
    privatize: Privatize | None = None,
) -> Iterator[GenerationStep]:
    """Yield each step's new tokens. ``decode(ids) -> str`` is needed for stop strings.

    Args:
        input_ids: (B, n) left-padded prompts; lengths: (B,) real lengths.
        privatize: clipping and noise applied to every hidden state before it goes to the
            trunk, at inference as in training (the seed paper's code sent clean states here).
    """
    if config.speculative is not None:  # several tokens per round trip (batch 1)
        from fedsea.training.speculative import speculative_steps

        yield from speculative_steps(split, stepper, input_ids, lengths, config, decode, privatize)
        return
    if config.stop and decode is None:
        raise ValueError("stop strings need a tokenizer to decode the text")
    decoder = SplitDecoder(split, stepper, input_ids, lengths, config.use_cache, privatize)
    try:
        processors = config.processors()
        generator = torch.Generator(device=input_ids.device)
        if config.seed is not None:
            generator.manual_seed(config.seed)
        device = input_ids.device
        eos = set(config.eos_token_id or ())
        pad = config.pad_token_id if config.pad_token_id is not None else next(iter(config.eos_token_id or (0,)))
        # The bookkeeping runs on the host: the one device sync of a step is the read of its tokens
        # (``tolist``); flags kept as device tensors would sync at every ``if`` on an accelerator.
        alive = [True] * input_ids.shape[0]
        rows = list(range(input_ids.shape[0]))  # original index of each running row
        new_ids: dict[int, list[int]] = {r: [] for r in rows}
        for step in range(config.max_new_tokens):
            logits = decoder.logits()[:, -1]  # (B_run, V)
            # decoder.ids (B_run, T): prompt + generated so far, for the repetition penalty
            scores = processors(cast(torch.LongTensor, decoder.ids), logits.float())
            if config.do_sample:
                token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
            else:
                token = scores.argmax(dim=-1)  # (B_run,)
            chosen: list[int] = token.tolist()  # the step's one host sync
            tokens = [t if alive[i] else pad for i, t in enumerate(chosen)]
            done = [alive[i] and t in eos for i, t in enumerate(tokens)]
            for i, row in enumerate(rows):
                if not alive[i]:
                    continue
                new_ids[row].append(tokens[i])
                if config.stop and not done[i] and decode is not None:
                    done[i] = first_stop(decode(new_ids[row]), config.stop) >= 0
            finished = tuple(rows[i] for i in range(len(rows)) if done[i])
            yield GenerationStep(step, {row: tokens[i] for i, row in enumerate(rows) if alive[i]}, finished)
            alive = [a and not d for a, d in zip(alive, done, strict=True)]
            if not any(alive) or step + 1 == config.max_new_tokens:
                return
            if config.drop_finished and not all(alive):
                keep = [i for i in range(len(rows)) if alive[i]]
                decoder.keep_rows(keep)
                rows = [rows[i] for i in keep]
                tokens, alive = [tokens[i] for i in keep], [True] * len(keep)
            # (B_run,) -> (B_run, 1) on the model's device; the copy does not wait for the device.
            token = torch.tensor(tokens, dtype=torch.int64).to(device, non_blocking=True)
            decoder.feed(token.unsqueeze(1))  # (B_run, 1)
    finally:
        decoder.close()


def _decoder_of(tokenizer: object | None) -> Callable[[list[int]], str] | None:
    if tokenizer is None:
        return None
    return lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True))  # type: ignore[attr-defined]


def generate(
    split: SplitModel,
    stepper: TrunkStepper,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    config: GenerationConfig,
    tokenizer: object | None = None,
    privatize: Privatize | None = None,
) -> GenerationOutput:
    """Run ``generate_steps`` to the end; decode texts if a tokenizer is given."""
    decode = _decoder_of(tokenizer)
    batch = input_ids.shape[0]
    ids: list[list[int]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    eos = set(config.eos_token_id or ())
    try:
        for out in generate_steps(split, stepper, input_ids, lengths, config, decode, privatize):
            for row, token in out.tokens.items():
                ids[row].append(token)
            for row in out.finished:
                reasons[row] = "eos" if ids[row][-1] in eos else "stop"
    finally:
        stepper.close()
    texts: list[str] = []
    if decode is not None:
        for row in range(batch):
            text = decode(ids[row])
            cut = first_stop(text, config.stop) if config.stop else -1
            texts.append(text[:cut] if cut >= 0 else text)
    return GenerationOutput(ids, texts, reasons)


class TextStream(Iterator[str]):
    """The text pieces of one answer as they are generated; once exhausted, ``finish_reason`` says
    why it ended: ``"stop"`` (an end-of-sequence token or a stop string) or ``"length"`` (cut at
    ``max_new_tokens``), as OpenAI's API names them."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces = pieces
        self.finish_reason: str | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)


def stream_text(
    split: SplitModel,
    stepper: TrunkStepper,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    config: GenerationConfig,
    tokenizer: object,
    privatize: Privatize | None = None,
) -> TextStream:
    """Text pieces of a single prompt as they are generated (stop strings never leak out)."""
    if input_ids.shape[0] != 1:
        raise ValueError("streaming is for one prompt at a time")
    stream = TextStream(iter(()))
    stream._pieces = _stream_pieces(split, stepper, input_ids, lengths, config, tokenizer, privatize, stream)
    return stream


def _stream_pieces(
    split: SplitModel,
    stepper: TrunkStepper,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    config: GenerationConfig,
    tokenizer: object,
    privatize: Privatize | None,
    stream: TextStream,
) -> Iterator[str]:

    decode = _decoder_of(tokenizer)
    assert decode is not None
    hold = max((len(s) for s in config.stop), default=1) - 1  # chars that might start a stop string
    ids: list[int] = []
    shown = 0
    try:
        for out in generate_steps(split, stepper, input_ids, lengths, config, decode, privatize):
            ids.extend(out.tokens.values())
            text = decode(ids)
            cut = first_stop(text, config.stop) if config.stop else -1
            if cut >= 0:
                stream.finish_reason = "stop"
                yield text[shown:cut]
                return
            # Hold back a possible stop-string prefix, and an incomplete UTF-8 character.
            safe = len(text) - hold if config.stop else len(text)
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
            if safe > shown:
                yield text[shown:safe]
                shown = safe
        text = decode(ids)
        eos = set(config.eos_token_id or ())
        cut_short = len(ids) >= config.max_new_tokens and not (ids and ids[-1] in eos)
        stream.finish_reason = "length" if cut_short else "stop"
        if len(text) > shown:
            yield text[shown:]
    finally:
        stepper.close()


@torch.no_grad()
def greedy_generate(
    split: SplitModel,
    stepper: TrunkStepper,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    privatize: Privatize | None = None,
) -> torch.Tensor:
    """Greedy new ids (B, k), k <= max_new_tokens, with Hugging Face ``generate``'s conventions.

    A row that emits ``eos_token_id`` is finished: it goes on being fed ``pad_token_id``
    (default: the EOS id, else 0) and its later slots hold it; generation stops when every row
    is finished. ``input_ids``: (B, n) left-padded prompts; ``lengths``: (B,) real lengths.
    """
    eos = () if eos_token_id is None else (int(eos_token_id),)
    config = GenerationConfig(max_new_tokens, eos_token_id=eos, drop_finished=False, pad_token_id=pad_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    steps: list[torch.Tensor] = []
    try:
        for out in generate_steps(split, stepper, input_ids, lengths, config, privatize=privatize):
            column = torch.full((input_ids.shape[0],), pad, dtype=torch.int64, device=input_ids.device)  # (B,)
            for row, token in out.tokens.items():
                column[row] = token
            steps.append(column)
    finally:
        stepper.close()
    return torch.stack(steps, dim=1)


def split_greedy_generate(
    split: SplitModel,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    traffic: CutTraffic | None = None,
) -> torch.Tensor:
    """Greedy decoding through head, trunk and tail in this process, a KV cache in each.

    Args:
        input_ids: (B, n) left-padded prompts; lengths: (B,) their real lengths.
        max_new_tokens: upper bound on new tokens.
        eos_token_id: a sequence that emits it is finished; later slots get ``pad_token_id``.
        traffic: if given, counts the bytes that crossed each cut.

    Returns:
        (B, k) new token ids, k <= max_new_tokens (generation stops when all are finished).
    """
    stepper = LocalStepper(split.trunk, traffic=traffic)
    return greedy_generate(split, stepper, input_ids, lengths, max_new_tokens, eos_token_id, pad_token_id)
