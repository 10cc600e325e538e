"""Pipelined steps in process: micro-batches give the unsplit step's losses and adapters (sigma = 0, dropout 0)."""

from __future__ import annotations

import pytest
import torch

import fedsea
from fedsea.model.adapters import adapter_state_dict
from fedsea.training import make_batch
from fedsea.training.pipeline import split_batch
from tests.conftest import randomize_lora

LORA = fedsea.LoraSpec(r=4, alpha=8, dropout=0.0)
OPTIM = fedsea.OptimConfig(lr=1e-2)
TEXTS = [
    "Review: sharp writing and warm performances.",
    "Dull.",
    "The council approved a new park.",
    "Question: is the sky blue? Answer: yes",
    "x",
]


def _split() -> fedsea.SplitModel:
    model = fedsea.tiny_llama(num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512)
    split = fedsea.split_model(model, 2, 1).add_lora(LORA)
    randomize_lora(model, seed=1)
    return split


def _batch(tokenizer, rows: int) -> fedsea.Batch:
    seqs = [tokenizer(t)["input_ids"] for t in TEXTS[:rows]]
    return make_batch(seqs, tokenizer.pad_token_id, loss_from=[2] * rows)


def assert_same_adapters(a: fedsea.SplitModel, b: fedsea.SplitModel) -> None:
    """Head, trunk and tail LoRA equal up to fp32 rounding.

    The gradients agree to ~2e-6 of their scale (summation order); AdamW divides by sqrt(v),
    which turns that into up to ~5e-6 on weights of scale 0.05 after 3 steps at lr 1e-2 where a
    gradient is near 0: hence atol 2e-5 on the weights.
    """
    for part in ("head", "trunk", "tail"):
        ours, theirs = adapter_state_dict(getattr(a, part)), adapter_state_dict(getattr(b, part))
        assert ours.keys() == theirs.keys() and ours
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=2e-5, msg=f"{part} {key}")


def assert_same_gradients(a: fedsea.SplitModel, b: fedsea.SplitModel) -> None:
    """Every LoRA gradient (head, trunk and tail) within 1e-5 of its scale."""
    ours = {n: p.grad for n, p in a.model.named_parameters() if "lora_" in n}
    theirs = {n: p.grad for n, p in b.model.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys() and len(ours) == 6 * 4 * 2
    for name, grad in theirs.items():
        assert grad is not None and ours[name] is not None, name
        scale = float(grad.abs().max())
        torch.testing.assert_close(ours[name], grad, rtol=0, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize(("rows", "count"), [(4, 2), (4, 4), (5, 2), (3, 3)])
def test_micro_batched_steps_equal_unsplit_steps(tiny_tokenizer, rows, count):
    unsplit, piped = _split(), _split()
    plain = fedsea.SplitTrainer(unsplit, optim=OPTIM)
    micro = fedsea.SplitTrainer(piped, optim=OPTIM, micro_batches=count)
    batch = _batch(tiny_tokenizer, rows)
    assert micro.compute_gradients(batch) == pytest.approx(plain.compute_gradients(batch), rel=1e-6)
    assert_same_gradients(piped, unsplit)
    for _ in range(3):
        a, b = plain.train_step(batch), micro.train_step(batch)
        assert b.loss == pytest.approx(a.loss, rel=1e-6) and a.num_targets == b.num_targets
    assert_same_adapters(piped, unsplit)


def test_micro_batch_slices_are_consecutive_rows_trimmed_to_their_longest(tiny_tokenizer):
    batch = _batch(tiny_tokenizer, 5)
    parts = split_batch(batch, 2)
    assert [int(p.input_ids.shape[0]) for p in parts] == [3, 2]
    assert sum(p.num_targets for p in parts) == batch.num_targets
    for part in parts:
        assert part.input_ids.shape[1] == int(part.lengths.max())
    assert torch.equal(torch.cat([p.lengths for p in parts]), batch.lengths)


@pytest.mark.parametrize("count", [0, -1, 2.0, True])
def test_bad_micro_batch_counts_are_refused(count):
    with pytest.raises(ValueError, match="micro_batches"):
        fedsea.SplitTrainer(_split(), micro_batches=count)


def test_a_batch_shorter_than_the_micro_batch_count_goes_in_one_slice_per_row(tiny_tokenizer):
    """An epoch's short last batch must not stop training: it is split into as many slices as rows."""
    with pytest.raises(ValueError, match="micro_batches=4 exceeds the batch size 3"):
        split_batch(_batch(tiny_tokenizer, 3), 4)  # the slicing itself still refuses
    pipelined = fedsea.SplitTrainer(_split(), micro_batches=4)
    unsplit = fedsea.SplitTrainer(_split(), micro_batches=1)
    batch = _batch(tiny_tokenizer, 3)
    torch.testing.assert_close(
        torch.tensor(pipelined.train_step(batch).loss), torch.tensor(unsplit.train_step(batch).loss)
    )


def test_micro_batches_refuse_a_head_regularizer():
    from fedsea.privacy.regularizers import make_head_regularizer

    split = _split()
    reg = make_head_regularizer("nopeek", 1.0, split.head.embed_tokens.weight.detach(), seed=3)
    with pytest.raises(ValueError, match="head regularizer"):
        fedsea.SplitTrainer(split, micro_batches=2, head_regularizer=reg)


def test_with_noise_every_micro_batch_gets_fresh_noise(tiny_tokenizer):
    trainer = fedsea.SplitTrainer(_split(), noise=fedsea.NoiseConfig(sigma=0.5, seed=3), micro_batches=2)
    batch = _batch(tiny_tokenizer, 4)
    slices = split_batch(batch, 2)
    with torch.no_grad():  # before the step changes the head
        clean = [trainer.split.head(s.input_ids, s.lengths) for s in slices]
    assert trainer.train_step(batch).loss > 0
    noise = [trainer.privatizer.resend((0, i)) - clean[i] for i in range(2)]  # each slice's payload, kept by key
    for part in noise:
        assert float(part.std()) == pytest.approx(0.5, rel=0.1)
    width = min(n.shape[1] for n in noise)
    assert not torch.allclose(noise[0][:, -width:], noise[1][:, -width:])  # separate draws, not one repeated


def test_messages_in_flight_share_the_emulated_bandwidth():
    """Two 0.1 s transfers at once on one direction take 0.2 s; the other direction is free."""
    import threading
    import time

    from fedsea.wire.shaper import NetShaper

    shaper = NetShaper(latency_ms=0, mbps=100)
    slept: list[float] = []
    threads = [threading.Thread(target=lambda: slept.append(shaper.wait(1_250_000))) for _ in range(2)]
    start = time.monotonic()
    for t in threads:
        t.start()
    down = shaper.wait(1_250_000, downlink=True)
    for t in threads:
        t.join()
    assert time.monotonic() - start == pytest.approx(0.2, abs=0.05)
    assert sorted(slept)[1] == pytest.approx(0.2, abs=0.02) and down == pytest.approx(0.1, abs=0.02)
