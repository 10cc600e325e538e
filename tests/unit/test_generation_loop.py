"""The generation loop in process: rewinding every part's KV cache, and the noise applied by the loop."""

from __future__ import annotations

import pytest
import torch

import fedsea
from fedsea.errors import InvalidInputError
from fedsea.tasks.runners import SplitRunner
from fedsea.training import LocalStepper, SplitDecoder, TrunkStepper
from tests.conftest import randomize_lora

NEW = 10  # tokens of the uninterrupted run


def _split(tiny_model: torch.nn.Module) -> fedsea.SplitModel:
    split = fedsea.split_model(tiny_model, head_layers=2, tail_layers=1).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=3, scale=0.2)
    return split


def greedy(decoder: SplitDecoder, count: int) -> torch.Tensor:
    """``count`` greedy tokens (B, count) from the decoder's pending tokens; the last is not fed."""
    tokens = []
    for i in range(count):
        token = decoder.logits()[:, -1].argmax(dim=-1)  # (B,)
        tokens.append(token)
        if i + 1 < count:
            decoder.feed(token.unsqueeze(1))
    return torch.stack(tokens, dim=1)


def rewound_run(decoder: SplitDecoder, prompt_slots: int, k: int, j: int) -> torch.Tensor:
    """Generate k tokens, rewind to the prompt + the first j of them, generate the rest of ``NEW``."""
    first = greedy(decoder, k)
    assert decoder.length == prompt_slots + k - 1  # the k-th token is not in any cache yet
    decoder.rewind(prompt_slots + j)
    assert decoder.length == prompt_slots + j
    decoder.feed(first[:, j : j + 1])  # token j + 1 again: its successor comes from the rewound caches
    return torch.cat([first[:, : j + 1], greedy(decoder, NEW - j - 1)], dim=1)


def check_rewind(split: fedsea.SplitModel, make_stepper, input_ids, lengths) -> None:
    """Shared by the local and the remote stepper: a rewound run equals an uninterrupted one."""
    reference = greedy(SplitDecoder(split, LocalStepper(split.trunk), input_ids, lengths), NEW)
    for k, j in [(6, 2), (4, 0), (NEW, NEW - 2)]:  # mid-run, back to the prompt, one slot
        stepper: TrunkStepper = make_stepper()
        try:
            out = rewound_run(SplitDecoder(split, stepper, input_ids, lengths), input_ids.shape[1], k, j)
        finally:
            stepper.close()
        assert torch.equal(out, reference), (k, j)


def test_rewind_then_generate_equals_an_uninterrupted_run(tiny_model, tiny_batch):
    split = _split(tiny_model)
    input_ids, lengths = tiny_batch
    check_rewind(split, lambda: LocalStepper(split.trunk), input_ids, lengths)
    # The loop's greedy output is the same tokens (and Hugging Face's: tests/unit/test_split_exactness.py).
    assert torch.equal(
        fedsea.split_greedy_generate(split, input_ids, lengths, NEW),
        greedy(SplitDecoder(split, LocalStepper(split.trunk), input_ids, lengths), NEW),
    )


def test_bad_rewinds_are_refused_naming_the_field(tiny_model, tiny_batch):
    split = _split(tiny_model)
    input_ids, lengths = tiny_batch
    stepper = LocalStepper(split.trunk)
    with pytest.raises(InvalidInputError, match=r"rewind\.length") as info:
        stepper.rewind(1)  # before the prefill: nothing cached
    assert info.value.field == "rewind.length"
    decoder = SplitDecoder(split, stepper, input_ids, lengths)
    greedy(decoder, 3)
    slots = decoder.length
    shortest = int(lengths.min()) + 2  # real tokens of the shortest row so far
    for bad in (0, slots + 1, slots - shortest):  # empty, longer than the cache, a whole row cut
        with pytest.raises(InvalidInputError, match=r"rewind\.length"):
            decoder.rewind(bad)
        with pytest.raises(InvalidInputError, match=r"rewind\.length"):
            stepper.rewind(bad)
    decoder.rewind(slots - shortest + 1)  # the shortest row keeps one token: allowed
    naive = SplitDecoder(split, LocalStepper(split.trunk, use_cache=False), input_ids, lengths, use_cache=False)
    greedy(naive, 2)
    with pytest.raises(InvalidInputError, match="no KV cache"):
        naive.rewind(naive.length - 1)


def test_the_loop_applies_the_noise_to_every_release(tiny_model, tiny_batch):
    split = _split(tiny_model)
    input_ids, lengths = tiny_batch
    shapes: list[tuple[int, ...]] = []

    def record(h: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(h.shape))
        return h

    clean = SplitRunner(split).generate(input_ids, lengths, 4, None, 0)
    assert torch.equal(SplitRunner(split, privatize=record).generate(input_ids, lengths, 4, None, 0), clean)
    batch, n, d = input_ids.shape[0], input_ids.shape[1], split.model.config.hidden_size
    assert shapes == [(batch, n, d)] + [(batch, 1, d)] * 3  # the prompt once, then each new token once
    zero = fedsea.Privatizer(fedsea.NoiseConfig(sigma=0.0, seed=1))
    loud = fedsea.Privatizer(fedsea.NoiseConfig(sigma=5.0, seed=1))
    assert torch.equal(SplitRunner(split, privatize=zero).generate(input_ids, lengths, 4, None, 0), clean)
    assert not torch.equal(SplitRunner(split, privatize=loud).generate(input_ids, lengths, 4, None, 0), clean)
