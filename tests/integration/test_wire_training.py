"""Training over a real gRPC server on loopback equals training in process."""

from __future__ import annotations

import pytest
import torch

import fedsea
from fedsea.client.split_client import SplitClient
from fedsea.config import ServerLimits
from fedsea.model.adapters import adapter_state_dict
from tests.conftest import assert_close_to_scale
from tests.integration.conftest import tiny_batch, tiny_split

OPTIM = fedsea.OptimConfig(lr=1e-2)


@pytest.mark.parametrize(("p", "q"), [(1, 1), (2, 1), (3, 2)])
def test_grpc_steps_equal_in_process_steps_exactly(server, tiny_tokenizer, p, q):
    local, remote = tiny_split(p, q), tiny_split(p, q)
    in_process = fedsea.SplitTrainer(local, optim=OPTIM)
    batch = tiny_batch(tiny_tokenizer)
    with SplitClient(server, remote, optim=OPTIM) as client:
        for _ in range(3):
            assert client.train_step(batch).loss == in_process.train_step(batch).loss
        served = client.trunk_adapter()
    expected = adapter_state_dict(local.trunk)
    assert served.keys() == expected.keys() and all(torch.equal(served[k], expected[k]) for k in expected)
    for part in ("head", "tail"):
        a, b = adapter_state_dict(getattr(local, part)), adapter_state_dict(getattr(remote, part))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_wire_within_tolerance(server, tiny_tokenizer, dtype):
    """Stated tolerance: client-side LoRA gradients within 3% of their scale; losses within 1% over 3 steps."""
    local, remote = tiny_split(), tiny_split()
    in_process = fedsea.SplitTrainer(local, optim=OPTIM)
    batch = tiny_batch(tiny_tokenizer)
    with SplitClient(server, remote, optim=OPTIM, wire_dtype=dtype) as client:
        assert client.trainer is not None
        client.trainer.compute_gradients(batch)  # no update anywhere
        in_process.compute_gradients(batch)
        for part in ("head", "tail"):
            ours = {n: p.grad for n, p in getattr(remote, part).named_parameters() if "lora_" in n}
            theirs = {n: p.grad for n, p in getattr(local, part).named_parameters() if "lora_" in n}
            for name, grad in theirs.items():
                assert_close_to_scale(ours[name], grad, rel=3e-2)
        for _ in range(3):
            ours_loss, theirs_loss = client.train_step(batch).loss, in_process.train_step(batch).loss
            assert ours_loss == pytest.approx(theirs_loss, rel=1e-2)
        stats = client.stats()
    # 2 bytes per element on the wire instead of 4.
    b, n = batch.input_ids.shape
    payload = b * n * 64 * 2
    assert 4 * payload <= stats["rpcs"]["forward"]["bytes_sent"] < 4 * payload * 1.05


def test_noise_is_applied_before_the_wire_and_resends_reuse_it(server, tiny_tokenizer):
    remote = tiny_split()
    noise = fedsea.NoiseConfig(sigma=0.5, seed=9)
    batch = tiny_batch(tiny_tokenizer)
    with torch.no_grad():
        clean = remote.head(batch.input_ids, batch.lengths)  # before the step changes the head
    with SplitClient(server, remote, optim=OPTIM, noise=noise) as client:
        result = client.train_step(batch)
        assert result.loss > 0
        assert client.trainer is not None
        payload = client.trainer.privatizer.resend(0)
    assert float((payload - clean).std()) == pytest.approx(0.5, rel=0.1)


def test_a_head_regularizer_over_the_wire_acts_on_the_head_only(server, tiny_tokenizer):
    """NoPeek through SplitClient equals NoPeek in process; it moves the head and nothing else."""
    from fedsea.privacy.regularizers import make_head_regularizer

    batch = tiny_batch(tiny_tokenizer)
    plain, local, remote = tiny_split(), tiny_split(), tiny_split()

    def nopeek(split):
        return make_head_regularizer("nopeek", 1.0, split.head.embed_tokens.weight.detach(), seed=3)

    fedsea.SplitTrainer(plain, optim=OPTIM).train_step(batch)
    fedsea.SplitTrainer(local, optim=OPTIM, head_regularizer=nopeek(local)).train_step(batch)
    with SplitClient(server, remote, optim=OPTIM, head_regularizer=nopeek(remote)) as client:
        client.train_step(batch)
        assert client.trainer is not None and client.trainer.head_regularizer.last_loss > 0
        served = client.trunk_adapter()
    for part in ("head", "tail"):
        a, b = adapter_state_dict(getattr(local, part)), adapter_state_dict(getattr(remote, part))
        assert all(torch.equal(a[k], b[k]) for k in a), part
    head_plain, head_reg = adapter_state_dict(plain.head), adapter_state_dict(local.head)
    assert any(not torch.equal(head_plain[k], head_reg[k]) for k in head_plain)  # the head learnt privacy
    tail_plain, tail_reg = adapter_state_dict(plain.tail), adapter_state_dict(local.tail)
    assert all(torch.equal(tail_plain[k], tail_reg[k]) for k in tail_plain)  # the task gradient is untouched
    trunk_plain = adapter_state_dict(plain.trunk)
    assert all(torch.equal(trunk_plain[k], served[k]) for k in trunk_plain)


def test_bytes_per_step_match_the_theory(server, tiny_tokenizer):
    batch = tiny_batch(tiny_tokenizer)
    with SplitClient(server, tiny_split(), optim=OPTIM) as client:
        client.train_step(batch)
        stats = client.stats()
    b, n = batch.input_ids.shape
    theoretical = 4 * b * n * 64 * 4  # four B x n x d fp32 tensors per step
    moved = sum(stats["rpcs"][r]["bytes_sent"] + stats["rpcs"][r]["bytes_received"] for r in ("forward", "backward"))
    assert theoretical <= moved <= 1.02 * theoretical + 400
    assert stats["server"]["forward"]["bytes_received"] == stats["rpcs"]["forward"]["bytes_sent"]
    assert stats["network_s"] > 0 and stats["local_compute_s"] > 0 and stats["remote_compute_s"] > 0


def test_tensors_above_the_message_limit_travel_in_chunks(make_server, tiny_tokenizer):
    limits = ServerLimits(max_message_bytes=64 * 1024)
    long_texts = ["word " * 150, "another text " * 40, "x"]
    batch = tiny_batch(tiny_tokenizer, long_texts)
    assert batch.input_ids.numel() * 64 * 4 > 2 * limits.max_message_bytes
    local, remote = tiny_split(), tiny_split()
    in_process = fedsea.SplitTrainer(local, optim=OPTIM)
    with make_server(limits) as address, SplitClient(address, remote, optim=OPTIM) as client:
        assert client.train_step(batch).loss == in_process.train_step(batch).loss
        stats = client.stats()
    assert stats["rpcs"]["forward"]["calls"] == 1
    assert stats["rpcs"]["forward"]["bytes_sent"] > 2 * limits.max_message_bytes


def test_saved_adapters_include_the_servers_trunk(server, tiny_tokenizer, tmp_path):
    remote = tiny_split()
    with SplitClient(server, remote, optim=OPTIM) as client:
        client.train_step(tiny_batch(tiny_tokenizer))
        served = client.trunk_adapter()
        client.save_adapters(tmp_path / "adapters")
    reloaded = fedsea.split_model(
        fedsea.tiny_llama(num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512), 2, 1
    )
    reloaded.load_adapters(tmp_path / "adapters")
    trunk = adapter_state_dict(reloaded.trunk)
    assert all(torch.equal(trunk[k], served[k]) for k in served)
