"""Defence (b), the privacy-trained head: weight 0 changes nothing; weight > 0 touches only the head.

``HookedSplitTrainer`` is ``SplitTrainer`` with the one line the regularizer needs, right
after the head's forward pass::

    h = self.head_regularizer.attach(h, batch.input_ids, batch.lengths, head.embed_tokens)
"""

from __future__ import annotations

import pytest
import torch

import fedsea
from fedsea.privacy.regularizers import (
    AdversarialProbeRegularizer,
    NoPeekRegularizer,
    distance_correlation,
    inject_loss,
)
from fedsea.training import make_batch
from fedsea.training.batch import lm_loss
from tests.conftest import assert_close_to_scale, randomize_lora

LORA = fedsea.LoraSpec(r=4, alpha=8, dropout=0.0)


class HookedSplitTrainer(fedsea.SplitTrainer):
    """``SplitTrainer._forward_backward`` plus the regularizer hook (marked below)."""

    def __init__(self, split, regularizer, **kwargs):
        super().__init__(split, **kwargs)
        self.head_regularizer = regularizer

    def _forward_backward(self, batch, update_remote):
        head, tail = self.split.head.train(), self.split.tail.train()
        h = head(batch.input_ids, batch.lengths)
        h = self.head_regularizer.attach(h, batch.input_ids, batch.lengths, head.embed_tokens)  # the hook
        h_noised = self.privatizer(h, key=self.steps)
        trunk_out = self.trunk.forward(h_noised.detach(), batch.lengths)
        received = trunk_out.detach().requires_grad_(True)
        loss = lm_loss(tail(received, batch.lengths), batch.labels)
        loss.backward()
        grad_in = self.trunk.backward(received.grad, update=update_remote)
        h_noised.backward(grad_in)
        self.steps += 1
        return loss.detach()


def _split(p=2, q=1):
    model = fedsea.tiny_llama(num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512)
    split = fedsea.split_model(model, p, q).add_lora(LORA)
    randomize_lora(model, seed=1)
    return split


def _batch(tokenizer):
    texts = ["The movie was a delight from start to finish.", "The plot is thin and the jokes fall flat."]
    return make_batch([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)


def _grads(split):
    return {n: p.grad.clone() for n, p in split.model.named_parameters() if "lora_" in n and p.grad is not None}


def _regularizers(weight, split):
    emb = split.head.embed_tokens.weight
    return [
        NoPeekRegularizer(weight),
        AdversarialProbeRegularizer(weight, emb, noise=fedsea.NoiseConfig(sigma=0.1, seed=0), width=32),
    ]


@pytest.mark.parametrize("which", [0, 1])
def test_weight_zero_is_exactly_no_change(tiny_tokenizer, which):
    batch = _batch(tiny_tokenizer)
    plain, hooked, central = _split(), _split(), _split()
    regularizer = _regularizers(0.0, hooked)[which]
    h = torch.randn(2, 3, 64, requires_grad=True)
    assert regularizer.attach(h, torch.zeros(2, 3, dtype=torch.int64), torch.tensor([3, 3]), None) is h
    loss_plain = fedsea.SplitTrainer(plain).compute_gradients(batch)
    loss_hooked = HookedSplitTrainer(hooked, regularizer).compute_gradients(batch)
    loss_central = fedsea.CentralTrainer(central).compute_gradients(batch)
    assert loss_hooked == loss_plain and loss_hooked == pytest.approx(loss_central, rel=1e-5)
    g_plain, g_hooked, g_central = _grads(plain), _grads(hooked), _grads(central)
    assert g_plain.keys() == g_hooked.keys() == g_central.keys() and g_plain
    for name in g_plain:
        assert torch.equal(g_hooked[name], g_plain[name]), name  # bit for bit
        assert_close_to_scale(g_hooked[name], g_central[name])  # split == centralized at sigma = 0


@pytest.mark.parametrize("which", [0, 1])
def test_positive_weight_changes_only_the_head_gradient(tiny_tokenizer, which):
    batch = _batch(tiny_tokenizer)
    plain, hooked = _split(), _split()
    regularizer = _regularizers(5.0, hooked)[which]
    fedsea.SplitTrainer(plain).compute_gradients(batch)
    HookedSplitTrainer(hooked, regularizer).compute_gradients(batch)
    assert regularizer.last_loss is not None and regularizer.last_loss >= 0
    g_plain, g_hooked = _grads(plain), _grads(hooked)
    head_changed = False
    for name, grad in g_plain.items():
        layer = int(name.split("layers.")[1].split(".")[0])
        if layer < hooked.head_layers:
            head_changed |= not torch.equal(g_hooked[name], grad)
        else:  # the trunk and the tail never see the head's extra loss
            assert torch.equal(g_hooked[name], grad), name
    if which == 0:  # the adversarial loss may be 0 already (relu): only NoPeek must move the head
        assert head_changed


def test_inject_loss_is_the_identity_forward_and_adds_the_loss_gradient():
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4)
    h = x @ w  # (5, 3)
    out = inject_loss(h, 2.0 * w.pow(2).sum())
    assert torch.equal(out, h)
    out.sum().backward()
    expected = x.sum(dim=0, keepdim=True).T.expand(4, 3) + 4.0 * w
    assert torch.allclose(w.grad, expected, atol=1e-5)


def test_distance_correlation_values():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=gen)
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-4)
    assert float(distance_correlation(x, 3 * x + 1)) == pytest.approx(1.0, abs=1e-4)
    independent = float(distance_correlation(x, torch.randn(400, 5, generator=gen)))
    assert 0 <= independent < 0.05
    y = x.clone().requires_grad_(True)
    distance_correlation(x, torch.tanh(y)).backward()
    assert torch.isfinite(y.grad).all()


def test_training_the_head_against_nopeek_lowers_the_distance_correlation(tiny_tokenizer):
    split = _split(p=1)
    batch = _batch(tiny_tokenizer)
    reg = NoPeekRegularizer(1.0)
    params = [p for n, p in split.head.named_parameters() if "lora_" in n]
    opt = torch.optim.Adam(params, lr=3e-2)
    emb = split.head.embed_tokens
    first = None
    for _ in range(15):
        loss = reg.loss(split.head(batch.input_ids, batch.lengths), batch.input_ids, batch.lengths, emb)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first - 0.02


def test_adversarial_probe_learns_and_validates():
    emb = torch.randn(50, 16)
    reg = AdversarialProbeRegularizer(1.0, emb, width=32, lr=1e-2, probe_steps=5)
    ids = torch.randint(0, 50, (4, 12))
    h = emb[ids] * 3  # token identity in plain sight
    accs = []
    for _ in range(4):
        reg.attach(h.clone().requires_grad_(True), ids, torch.full((4,), 12), None)
        accs.append(reg.last_probe_accuracy)
    assert accs[-1] > accs[0] and reg.last_loss > 0
    with pytest.raises(ValueError, match="weight"):
        NoPeekRegularizer(-1.0)
