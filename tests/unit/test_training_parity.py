"""Split training step == centralized training step (sigma = 0): gradients and updates."""

from __future__ import annotations

import pytest
import torch

import fedsea
from fedsea.model.adapters import adapter_state_dict
from fedsea.training import make_batch
from tests.conftest import assert_close_to_scale, randomize_lora


def _batch(tokenizer):
    prompts = ["Review: sharp writing and warm performances. Sentiment:", "Review: thin plot. Sentiment:"]
    completions = [" positive", " negative"]
    seqs, starts = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(completion)["input_ids"]
        seqs.append(p + c)
        starts.append(len(p))
    return make_batch(seqs, tokenizer.pad_token_id, loss_from=starts)


def _pair(p, q, lora):
    """Two identical models with identical random adapters: one to split, one to train centrally."""
    out = []
    for _ in range(2):
        model = fedsea.tiny_llama(num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512)
        split = fedsea.split_model(model, p, q).add_lora(lora)
        randomize_lora(model, seed=1)
        out.append(split)
    return out


LORA = fedsea.LoraSpec(r=4, alpha=8, dropout=0.0)


@pytest.mark.parametrize(("p", "q"), [(1, 1), (2, 2), (4, 1)])
def test_lora_gradients_equal_centralized(tiny_tokenizer, p, q):
    split_side, central_side = _pair(p, q, LORA)
    batch = _batch(tiny_tokenizer)
    loss_split = fedsea.SplitTrainer(split_side).compute_gradients(batch)
    loss_central = fedsea.CentralTrainer(central_side).compute_gradients(batch)
    assert loss_split == pytest.approx(loss_central, rel=1e-5)
    central_grads = {n: p.grad for n, p in central_side.model.named_parameters() if "lora_" in n}
    split_grads = {n: p.grad for n, p in split_side.model.named_parameters() if "lora_" in n}
    assert central_grads.keys() == split_grads.keys() and len(split_grads) == 6 * 4 * 2
    for name, grad in central_grads.items():
        assert grad is not None and float(grad.abs().max()) > 0, name
        assert_close_to_scale(split_grads[name], grad)


def test_training_steps_track_centralized_and_lower_the_loss(tiny_tokenizer):
    split_side, central_side = _pair(2, 1, LORA)
    optim = fedsea.OptimConfig(lr=1e-2)
    split_trainer = fedsea.SplitTrainer(split_side, optim=optim, noise=fedsea.NoiseConfig(sigma=0.0))
    central_trainer = fedsea.CentralTrainer(central_side, optim=optim)
    batch = _batch(tiny_tokenizer)
    losses = []
    for _ in range(5):
        a, b = split_trainer.train_step(batch), central_trainer.train_step(batch)
        assert a.loss == pytest.approx(b.loss, rel=1e-4)
        losses.append(a.loss)
    assert losses[-1] < losses[0]
    for part in ("head", "trunk", "tail"):
        ours = adapter_state_dict(getattr(split_side, part))
        theirs = adapter_state_dict(getattr(central_side, part))
        for key in theirs:
            assert_close_to_scale(ours[key], theirs[key], rel=1e-4)


def test_noise_changes_what_the_trunk_sees_but_training_still_runs(tiny_tokenizer):
    split_side, _ = _pair(1, 1, LORA)
    trainer = fedsea.SplitTrainer(split_side, noise=fedsea.NoiseConfig(sigma=0.5, seed=3))
    result = trainer.train_step(_batch(tiny_tokenizer))
    assert result.num_targets > 0 and result.loss > 0
    # The exact payload of step 0 is kept for a retry.
    payload = trainer.privatizer.resend(0)
    assert payload.shape[-1] == 64 and not payload.requires_grad


def test_frozen_base_only_lora_trains(tiny_tokenizer):
    split_side, _ = _pair(1, 1, LORA)
    base_before = {n: p.detach().clone() for n, p in split_side.model.named_parameters() if "lora_" not in n}
    fedsea.SplitTrainer(split_side, optim=fedsea.OptimConfig(lr=1e-2)).train_step(_batch(tiny_tokenizer))
    for name, param in split_side.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_before[name]), name


def test_make_batch_left_pads_and_masks_prompts():
    batch = make_batch([[5, 6, 7], [8]], pad_token_id=0, loss_from=[1, 0])
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.lengths.tolist() == [3, 1]
    assert batch.labels.tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch.num_targets == 2
    with pytest.raises(ValueError):
        make_batch([], pad_token_id=0)


class _RecordingTrunk(fedsea.training.LocalTrunk):
    """The real local trunk, keeping the gradient each backward received (the upward message)."""

    def __init__(self, trunk):
        super().__init__(trunk, fedsea.OptimConfig())
        self.grads = []

    def backward(self, grad, update=True):
        self.grads.append(grad.detach().clone())
        return super().backward(grad, update)


def test_gradient_noise_on_the_upward_message(tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    runs = {}
    for name, grad_noise in {
        "clean": None,
        "no-op": fedsea.NoiseConfig(sigma=0.0, clip_norm=1e9),
        "noised": fedsea.NoiseConfig(sigma=1e-3, clip_norm=1e-3, seed=5),
    }.items():
        split, _ = _pair(2, 1, LORA)
        link = _RecordingTrunk(split.trunk)
        trainer = fedsea.SplitTrainer(split, trunk=link, grad_noise=grad_noise)
        trainer.compute_gradients(batch)
        runs[name] = (link.grads[0], trainer, split)
    clean, _, clean_split = runs["clean"]
    # A clip norm nobody reaches and no noise: the very same step.
    assert torch.equal(runs["no-op"][0], clean)
    # Otherwise the trunk receives clip(dL/dh) + N(0, sigma^2), drawn from the client's seeded generator.
    sent, trainer, split = runs["noised"]
    expected = fedsea.privacy.noise.clip_per_token(clean, 1e-3)
    expected = expected + 1e-3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(sent, expected, atol=1e-9)
    assert torch.equal(trainer.grad_privatizer.resend(0), sent)  # a retry resends this payload
    assert float(clean.norm(dim=-1).max()) > 1e-3  # the clip did something
    trunk_grads = [p.grad for n, p in split.trunk.named_parameters() if "lora_" in n]
    clean_grads = [p.grad for n, p in clean_split.trunk.named_parameters() if "lora_" in n]
    assert any(not torch.allclose(a, b) for a, b in zip(trunk_grads, clean_grads, strict=True))
