"""Lossy wire compression as a session setting (issue 13), over a real loopback server."""

from __future__ import annotations

import grpc
import pytest
import torch

import fedsea
from fedsea.client.split_client import SplitClient
from fedsea.model.fingerprint import model_fingerprint
from fedsea.wire import compress
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire import fedsea_pb2_grpc as pb_grpc
from fedsea.wire.tensors import decode, encode
from tests.conftest import assert_close_to_scale
from tests.integration.conftest import TINY, tiny_batch, tiny_split
from tests.unit.test_wire_compression import KINDS, TOLERANCE

OPTIM = fedsea.OptimConfig(lr=1e-2)
D = TINY["hidden_size"]


def _moved(stats: dict) -> int:
    rpcs = stats["rpcs"]
    return sum(rpcs[r]["bytes_sent"] + rpcs[r]["bytes_received"] for r in ("forward", "backward"))


def _one_step(server: str, batch: fedsea.Batch, **wire: str) -> tuple[float, dict[str, torch.Tensor], int]:
    """(loss, client LoRA gradients, bytes moved) of one step's gradients over the wire; nothing updates."""
    split = tiny_split()
    with SplitClient(server, split, optim=OPTIM, **wire) as client:
        assert client.trainer is not None
        loss = client.trainer.compute_gradients(batch)
        grads = {
            f"{part}.{n}": p.grad.clone()
            for part in ("head", "tail")
            for n, p in getattr(split, part).named_parameters()
            if "lora_" in n and p.grad is not None
        }
        stats = client.stats()
    assert stats["wire_compression"] == wire.get("wire_compression", "none")
    return float(loss), grads, _moved(stats)


@pytest.mark.parametrize("kind", KINDS)
def test_a_compressed_session_trains_within_the_stated_tolerance_at_a_quarter_of_the_bytes(
    server, tiny_tokenizer, kind
):
    batch = tiny_batch(tiny_tokenizer)
    exact = fedsea.SplitTrainer(tiny_split(), optim=OPTIM)  # in process: no wire at all
    loss = float(exact.compute_gradients(batch))
    grads = {
        f"{part}.{n}": p.grad
        for part in ("head", "tail")
        for n, p in getattr(exact.split, part).named_parameters()
        if "lora_" in n and p.grad is not None
    }
    loss_c, grads_c, moved_c = _one_step(server, batch, wire_compression=kind)
    tol, grad_tol = TOLERANCE[kind]
    assert loss_c == pytest.approx(loss, rel=tol)
    assert grads_c.keys() == grads.keys() and grads
    assert any(not torch.equal(grads_c[n], g) for n, g in grads.items())  # it is lossy...
    for name, grad in grads.items():
        assert_close_to_scale(grads_c[name], grad, rel=grad_tol)  # ...within the stated tolerance
    # Four B x n x d tensors a step, one byte per element and a float32 scale per token (row).
    b, n = batch.input_ids.shape
    theoretical = 4 * b * n * (D + 4)
    assert theoretical <= moved_c <= 1.02 * theoretical + 400
    _, _, moved_fp32 = _one_step(server, batch)  # the tiny model is float32: an fp32 wire
    _, _, moved_bf16 = _one_step(server, batch, wire_dtype="bf16")
    # A quarter of fp32 and half of bf16, plus the scales (4 / d of the codes: 6% at this tiny
    # d = 64, 0.1% at d = 4096).
    assert moved_c / moved_fp32 == pytest.approx((D + 4) / (4 * D), rel=0.03)
    assert moved_c / moved_bf16 == pytest.approx((D + 4) / (2 * D), rel=0.03)


def _open(stub: pb_grpc.TrunkStub, compression: int = pb.TensorChunk.NONE) -> pb.OpenSessionResponse:
    request = pb.OpenSessionRequest(
        base_fingerprint=model_fingerprint(fedsea.tiny_llama(**TINY)),
        head_layers=2,
        tail_layers=1,
        trunk_lora=pb.LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj"]),
        optimizer=pb.OptimizerConfig(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8),
        wire_dtype=pb.FLOAT32,
        wire_compression=compression,
    )
    return stub.OpenSession(request, timeout=30)


def _forward(stub: pb_grpc.TrunkStub, session_id: str, t: torch.Tensor, kind: int, step: int = 0) -> list:
    chunks = list(encode(t, pb.FLOAT32, compression=kind))
    requests = [pb.ForwardRequest(session_id=session_id, step=step, lengths=[3, 2], hidden=chunks[0])]
    requests += [pb.ForwardRequest(hidden=c) for c in chunks[1:]]
    return list(stub.Forward(iter(requests), timeout=30))


def _backward(stub: pb_grpc.TrunkStub, session_id: str, t: torch.Tensor, kind: int, step: int = 0) -> list:
    chunks = list(encode(t, pb.FLOAT32, compression=kind))
    requests = [pb.BackwardRequest(session_id=session_id, step=step, update=True, grad=chunks[0])]
    requests += [pb.BackwardRequest(grad=c) for c in chunks[1:]]
    return list(stub.Backward(iter(requests), timeout=30))


def _refused(call) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return str(info.value.details())


def test_a_session_refuses_chunks_compressed_otherwise_and_stays_usable(server):
    int8, fp8 = compress.COMPRESSIONS["int8"], compress.COMPRESSIONS.get("fp8", pb.TensorChunk.FP8_E4M3_ROWS)
    hidden, grad = torch.randn(2, 3, D), torch.randn(2, 3, D)
    with grpc.insecure_channel(server) as channel:
        stub = pb_grpc.TrunkStub(channel)
        exact = _open(stub).session_id  # no compression asked for
        details = _refused(lambda: _forward(stub, exact, hidden, int8))
        assert details.startswith("hidden:") and "int8" in details
        replies = _forward(stub, exact, hidden, pb.TensorChunk.NONE)  # the session goes on
        assert all(r.hidden.compression == pb.TensorChunk.NONE for r in replies)
        assert _refused(lambda: _backward(stub, exact, grad, int8)).startswith("grad:")
        back = decode((r.grad for r in _backward(stub, exact, grad, pb.TensorChunk.NONE)), "grad", 1 << 20)
        assert back.shape == grad.shape

        lossy = _open(stub, int8).session_id
        assert _refused(lambda: _forward(stub, lossy, hidden, fp8)).startswith("hidden:")  # not its compression
        replies = _forward(stub, lossy, hidden, int8)
        assert replies[0].hidden.compression == pb.TensorChunk.INT8_ROWS  # answered in the session's
        out = decode((r.hidden for r in replies), "hidden", 1 << 20, allow_compression=True)
        assert out.shape == hidden.shape and bool(torch.isfinite(out).all())
        # Exact chunks are always accepted: a client may skip compressing a tensor.
        replies = _backward(stub, lossy, grad, pb.TensorChunk.NONE)
        assert replies[0].grad.compression == pb.TensorChunk.INT8_ROWS

        details = _refused(lambda: _open(stub, 7))
        assert details.startswith("wire_compression:")


def test_generation_streams_in_the_sessions_compression(server, tiny_tokenizer):
    enc = tiny_tokenizer(["The movie was a delight", "Hi"], return_tensors="pt", padding=True)
    lengths = enc["attention_mask"].sum(dim=1)
    sent = {}
    for kind in ("none", "int8"):
        with SplitClient(server, tiny_split(), tokenizer=tiny_tokenizer, wire_compression=kind) as client:
            out = client.generate_ids(enc["input_ids"], lengths, max_new_tokens=6, eos_token_id=())
            assert len(out.token_ids) == 2 and all(len(row) == 6 for row in out.token_ids)
            sent[kind] = client.stats()["rpcs"]["generate"]["bytes_sent"]
    assert sent["int8"] < 0.4 * sent["none"]  # fp32 (4 bytes) against one byte and a scale per token


def test_a_generation_stream_refuses_chunks_its_session_did_not_agree_on(server):
    with grpc.insecure_channel(server) as channel:
        stub = pb_grpc.TrunkStub(channel)
        session = _open(stub).session_id  # no compression
        chunk = next(encode(torch.randn(1, 3, D), pb.FLOAT32, compression=compress.COMPRESSIONS["int8"]))
        requests = [
            pb.GenerateRequest(open=pb.GenerateOpen(session_id=session, max_length=8)),
            pb.GenerateRequest(step=pb.GenerateStep(step=0, lengths=[3], hidden=chunk)),
        ]
        details = _refused(lambda: list(stub.Generate(iter(requests), timeout=30)))
        assert details.startswith("hidden:") and "int8" in details
        assert _forward(stub, session, torch.randn(2, 3, D), pb.TensorChunk.NONE)  # the session is still usable
