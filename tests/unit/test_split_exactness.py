"""The first invariant: with no noise, head -> trunk -> tail equals the unsplit model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedsea
from fedsea.model.masks import padding_mask, position_ids
from tests.conftest import TINY_LAYERS, assert_close_to_scale

PARTITIONS = [(1, 1), (2, 2), (1, 3), (3, 2), (TINY_LAYERS - 2, 1)]


@pytest.mark.parametrize(("p", "q"), PARTITIONS)
def test_split_logits_equal_unsplit_model(tiny_model, tiny_batch, p, q):
    input_ids, lengths = tiny_batch
    assert len(set(lengths.tolist())) == 3, "the batch must mix lengths"
    split = fedsea.split_model(tiny_model, head_layers=p, tail_layers=q)
    with torch.no_grad():
        logits = split(input_ids, lengths)  # (B, n, V)
        reference = fedsea.central_forward(tiny_model, input_ids, lengths)
    assert_close_to_scale(logits, reference)
    # Each sequence alone, unpadded, through plain Hugging Face: left padding changes nothing.
    for b, length in enumerate(lengths.tolist()):
        with torch.no_grad():
            alone = tiny_model(input_ids[b : b + 1, -length:]).logits[0]
        assert_close_to_scale(logits[b, -length:], alone)


def test_parts_compose_from_views_of_one_model(tiny_model):
    split = fedsea.split_model(tiny_model, head_layers=2, tail_layers=1)
    assert split.head.embed_tokens is tiny_model.model.embed_tokens
    assert split.tail.lm_head is tiny_model.lm_head
    # Tied embeddings stay with the client's parts: both ends share one matrix.
    assert split.tail.lm_head.weight.data_ptr() == split.head.embed_tokens.weight.data_ptr()
    assert list(split.head.layers) == ["0", "1"]
    assert list(split.trunk.layers) == ["2", "3", "4"]
    assert list(split.tail.layers) == ["5"]
    assert split.trunk.layers["2"] is tiny_model.model.layers[2]
    trunk_names = {n for n, _ in split.trunk.named_parameters()}
    assert not any("embed" in n or "lm_head" in n for n in trunk_names)


@settings(max_examples=15, deadline=None)
@given(
    p=st.integers(1, TINY_LAYERS - 2),
    q=st.integers(1, TINY_LAYERS - 2),
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_split_equals_unsplit_for_any_partition_and_lengths(p, q, lengths, seed):
    if p + q >= TINY_LAYERS:
        return
    model = fedsea.tiny_llama(num_layers=TINY_LAYERS, hidden_size=32, num_heads=4, num_kv_heads=2, vocab_size=300)
    n = max(lengths)
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 300, (len(lengths), n), generator=gen)
    lens = torch.tensor(lengths)
    split = fedsea.split_model(model, head_layers=p, tail_layers=q)
    with torch.no_grad():
        logits = split(input_ids, lens)
        reference = fedsea.central_forward(model, input_ids, lens)
    mask = padding_mask(lens, n).bool()  # compare real tokens only
    assert_close_to_scale(logits[mask], reference[mask])


def test_position_ids_follow_generate_convention():
    lengths = torch.tensor([3, 1, 4])
    assert padding_mask(lengths, 4).tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]
    assert position_ids(lengths, 4, 4).tolist() == [[1, 0, 1, 2], [1, 1, 1, 0], [0, 1, 2, 3]]
    # Decoding one new token after 4 slots: positions continue from each sequence's own count.
    assert position_ids(lengths + 1, 5, 1).tolist() == [[3], [1], [4]]


def test_kv_cached_parts_equal_full_recompute(tiny_model, tiny_batch):
    input_ids, lengths = tiny_batch
    split = fedsea.split_model(tiny_model, head_layers=2, tail_layers=2)
    extra = torch.tensor([[7], [42], [300]])
    with torch.no_grad():
        full = split(torch.cat([input_ids, extra], dim=1), lengths + 1)[:, -1]
        caches = [part.new_cache() for part in (split.head, split.trunk, split.tail)]
        h = split.head(input_ids, lengths, cache=caches[0])
        h = split.trunk(h, lengths, cache=caches[1])
        split.tail(h, lengths, cache=caches[2])
        h = split.head(extra, lengths + 1, cache=caches[0])
        h = split.trunk(h, lengths + 1, cache=caches[1])
        step = split.tail(h, lengths + 1, cache=caches[2])[:, -1]
    assert_close_to_scale(step, full)


def test_split_greedy_generation_matches_hf_generate(tiny_model, tiny_tokenizer, tiny_batch):
    input_ids, lengths = tiny_batch
    split = fedsea.split_model(tiny_model, head_layers=1, tail_layers=1)
    traffic = fedsea.CutTraffic()
    ours = fedsea.split_greedy_generate(split, input_ids, lengths, 12, traffic=traffic)
    attention_mask = padding_mask(lengths, input_ids.shape[1])
    with torch.no_grad():
        theirs = tiny_model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tiny_tokenizer.pad_token_id,
        )[:, input_ids.shape[1] :]
    assert torch.equal(ours, theirs)
    # After the prefill, each step moves one d-wide fp32 vector per sequence each way (+ int32 lengths).
    batch, d = input_ids.shape[0], tiny_model.config.hidden_size
    assert traffic.per_step[1] == 2 * batch * d * 4 + batch * 4
    assert traffic.per_step[0] == 2 * batch * input_ids.shape[1] * d * 4 + batch * 4


def test_generation_stops_at_eos_and_pads_finished_rows(tiny_model, tiny_batch):
    input_ids, lengths = tiny_batch
    split = fedsea.split_model(tiny_model, head_layers=1, tail_layers=1)
    free = fedsea.split_greedy_generate(split, input_ids, lengths, 8)
    eos = int(free[0, 2])  # pretend the third token row 0 emits is the end of text
    out = fedsea.split_greedy_generate(split, input_ids, lengths, 8, eos_token_id=eos, pad_token_id=0)
    row = out[0].tolist()
    first = row.index(eos)
    assert all(t == 0 for t in row[first + 1 :])
