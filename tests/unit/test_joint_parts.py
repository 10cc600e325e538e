"""A client's concurrent generations joined into shared head and tail passes (``fedsea.training.shared_parts``)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import fedsea
from fedsea.errors import InvalidInputError
from fedsea.training import JointParts, LocalStepper, SplitDecoder, joint_parts
from tests.conftest import assert_close_to_scale, randomize_lora

NEW = 8  # tokens per generation


class _Decoder:
    """Stands in for a running decoder where only the count matters (weak-referenceable)."""


def _split(tiny_model: torch.nn.Module) -> fedsea.SplitModel:
    # LoRA on every part, non-zero: the joint passes must run the head's and tail's adapter too.
    split = fedsea.split_model(tiny_model, head_layers=2, tail_layers=1).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=5, scale=0.2)
    return split


def _prompts(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (1, n), generator=g) for n in (5, 9, 14, 7)]  # (1, n) each


def _greedy(decoder: SplitDecoder) -> tuple[list[int], list[torch.Tensor]]:
    """NEW greedy tokens and each step's (1, V) logits."""
    tokens, logits = [], []
    try:
        for _ in range(NEW):
            step = decoder.logits()[:, -1]  # (1, V)
            logits.append(step)
            token = step.argmax(dim=-1)
            tokens.append(int(token))
            decoder.feed(token.unsqueeze(1))
    finally:
        decoder.close()
    return tokens, logits


def test_concurrent_generations_share_passes_and_match_running_alone(tiny_model):
    split = _split(tiny_model)
    prompts = _prompts(int(split.model.config.vocab_size))

    def decoder(ids: torch.Tensor) -> SplitDecoder:
        return SplitDecoder(split, LocalStepper(split.trunk), ids, torch.tensor([ids.shape[1]]))

    alone = [_greedy(decoder(ids)) for ids in prompts]  # one after the other: every call runs alone
    parts = joint_parts(split)
    assert parts is joint_parts(split)  # one per split model
    assert parts.stats.most == 1

    # All four open before any runs, and a long wait: every pass then carries all four (deterministic).
    parts.wait_ms = 10_000.0
    parts.stats = type(parts.stats)()
    results: list[tuple[list[int], list[torch.Tensor]] | None] = [None] * len(prompts)
    opened = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        made = decoder(prompts[i])  # opened in the thread that steps it
        opened.wait()  # all four open before any steps
        results[i] = _greedy(made)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert parts.stats.passes == {"head": NEW, "tail": NEW}  # prefills (of four lengths) and decode steps
    assert parts.stats.calls == {"head": 4 * NEW, "tail": 4 * NEW}
    assert parts.stats.most == 4
    for (tokens, logits), result in zip(alone, results, strict=True):
        assert result is not None
        assert result[0] == tokens
        for a, b in zip(logits, result[1], strict=True):
            assert_close_to_scale(b, a, rel=1e-4)  # projections over more rows: rounding, over 8 cached steps


def test_a_bad_call_fails_alone(tiny_model):
    split = _split(tiny_model)
    parts = JointParts(split, wait_ms=10_000.0)
    holders = [_Decoder(), _Decoder()]
    opened = threading.Barrier(2)
    vocab = int(split.model.config.vocab_size)
    good = torch.tensor([[5, 6, 7]])
    bad = torch.tensor([[5, vocab + 3]])  # an id out of range
    out: dict[str, object] = {}

    def call(name: str, ids: torch.Tensor) -> None:
        token = parts.open(holders[name == "bad"])  # a decoder stepped by this thread
        opened.wait()
        try:
            out[name] = parts.run_head(ids, torch.tensor([ids.shape[1]]), split.head.new_cache(), token)
        except Exception as exc:
            out[name] = exc
        finally:
            parts.close(token)

    threads = [threading.Thread(target=call, args=a) for a in (("good", good), ("bad", bad))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert parts.stats.passes["head"] == 1 and parts.stats.most == 2  # one joint pass for both
    assert isinstance(out["bad"], InvalidInputError) and "input_ids" in str(out["bad"])
    with torch.no_grad():
        expected = split.head(good, torch.tensor([3]))
    assert isinstance(out["good"], torch.Tensor)
    torch.testing.assert_close(out["good"], expected, rtol=1e-6, atol=1e-6)


def test_disabled_runs_every_call_alone(tiny_model):
    split = _split(tiny_model)
    parts = joint_parts(split)
    parts.enabled = False
    ids = _prompts(int(split.model.config.vocab_size))[0]
    tokens, _ = _greedy(SplitDecoder(split, LocalStepper(split.trunk), ids, torch.tensor([ids.shape[1]])))
    assert len(tokens) == NEW
    assert parts.stats.passes == {"head": 0, "tail": 0}


def test_a_leader_does_not_wait_for_a_closed_decoder(tiny_model):
    split = _split(tiny_model)
    parts = JointParts(split, wait_ms=60_000.0)
    other = _Decoder()
    parts.close(parts.open(other))  # gone: a lone call must not wait the minute for it
    with torch.no_grad():
        h = parts.run_head(torch.tensor([[5, 6]]), torch.tensor([2]), None)
    assert h.shape == (1, 2, split.head.hidden_size)


@pytest.mark.parametrize("keep", [1, 3])
def test_joint_tail_keeps_the_last_slots(tiny_model, keep):
    split = _split(tiny_model)
    parts = JointParts(split, wait_ms=10_000.0)
    holders = [_Decoder(), _Decoder()]
    opened = threading.Barrier(2)
    g = torch.Generator().manual_seed(1)
    states = [torch.randn(1, n, split.tail.hidden_size, generator=g) for n in (4, 6)]
    out: list[torch.Tensor | None] = [None, None]

    def call(i: int) -> None:
        token = parts.open(holders[i])  # a decoder stepped by this thread
        opened.wait()
        out[i] = parts.run_tail(states[i], torch.tensor([states[i].shape[1]]), split.tail.new_cache(), keep, token)
        parts.close(token)

    with torch.no_grad():
        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert parts.stats.most == 2
        for i, s in enumerate(states):
            expected = split.tail(s, torch.tensor([s.shape[1]]), logits_to_keep=keep)  # (1, keep, V)
            assert out[i] is not None and out[i].shape == expected.shape
            assert_close_to_scale(out[i], expected, rel=1e-5)


def test_ordinary_forwards_beside_joint_passes_of_the_same_model(tiny_model):
    """A joint pass switches the shared config's attention: another thread's ordinary forward waits for it."""
    from fedsea.model.joint import JointInput, joint_forward

    split = _split(tiny_model)
    ids = torch.tensor([[4, 9, 2, 7, 5]])
    g = torch.Generator().manual_seed(2)
    states = [torch.randn(1, n, split.tail.hidden_size, generator=g) for n in (3, 5)]
    with torch.no_grad():
        expected_head = split.head(ids, torch.tensor([5]))
        expected_tail = [split.tail.normed(s, torch.tensor([s.shape[1]])) for s in states]
    errors: list[BaseException] = []

    def ordinary() -> None:
        try:
            with torch.no_grad():
                for _ in range(40):
                    assert_close_to_scale(split.head(ids, torch.tensor([5])), expected_head, rel=1e-6)
        except BaseException as exc:
            errors.append(exc)

    def joint() -> None:
        try:
            with torch.no_grad():
                for _ in range(40):
                    inputs = [JointInput(s, torch.tensor([s.shape[1]]), None, None) for s in states]
                    outs = joint_forward(split.tail, inputs, row_adapters=False)
                    for out, want in zip(outs, expected_tail, strict=True):
                        assert_close_to_scale(split.tail.norm(out), want, rel=1e-5)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ordinary), threading.Thread(target=joint)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    assert split.model.config._attn_implementation != "fedsea_joint"  # switched back


def test_decoders_interleaved_in_one_thread_are_not_waited_for(tiny_model):
    """Two generations stepped alternately by one thread: neither can call while the other waits."""
    split = _split(tiny_model)
    parts = JointParts(split, wait_ms=60_000.0)
    holders = [_Decoder(), _Decoder()]
    for holder in holders:
        parts.open(holder)  # both in this thread
    start = time.monotonic()
    with torch.no_grad():
        for _ in range(3):
            parts.run_head(torch.tensor([[5, 6]]), torch.tensor([2]), None)
    assert time.monotonic() - start < 30  # a wait for the other decoder would take the minute
    assert parts.stats.passes["head"] == 3 and parts.stats.most == 1


def test_an_idle_thread_is_not_waited_for_and_a_failed_pass_frees_the_part(tiny_model, monkeypatch):
    from fedsea.training import shared_parts

    monkeypatch.setattr(shared_parts, "IDLE_S", 0.2)
    split = _split(tiny_model)
    parts = JointParts(split, wait_ms=60_000.0)
    holder, release = _Decoder(), threading.Event()

    def idle() -> None:  # a thread with an open decoder that does not step it (a paused consumer)
        token = parts.open(holder)
        release.wait(60)
        parts.close(token)

    thread = threading.Thread(target=idle)
    thread.start()
    try:
        time.sleep(0.5)  # past IDLE_S
        start = time.monotonic()
        with torch.no_grad():
            with pytest.raises(InvalidInputError):  # a failed pass (an id out of range) ...
                parts.run_head(torch.tensor([[5, 10**6]]), torch.tensor([2]), None)
            h = parts.run_head(torch.tensor([[5, 6]]), torch.tensor([2]), None)  # ... leaves the part free
        assert time.monotonic() - start < 30  # a wait for the idle thread would take the minute
        assert h.shape == (1, 2, split.head.hidden_size)
    finally:
        release.set()
        thread.join(60)
