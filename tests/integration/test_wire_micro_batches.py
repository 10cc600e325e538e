"""Pipelined steps over a real loopback server: micro-batches equal the unsplit step, bad slices are refused."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
import torch

import fedsea
from fedsea.client.split_client import SplitClient
from fedsea.model.adapters import adapter_state_dict
from fedsea.training import make_batch
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.tensors import encode
from tests.integration.conftest import tiny_batch, tiny_split

OPTIM = fedsea.OptimConfig(lr=1e-2)
TEXTS = [
    "Review: sharp writing and warm performances.",
    "Dull.",
    "The council approved a new park.",
    "Question: is the sky blue? Answer: yes",
    "x y z",
]


def _batch(tokenizer, rows: int) -> fedsea.Batch:
    return make_batch([tokenizer(t)["input_ids"] for t in TEXTS[:rows]], tokenizer.pad_token_id)


def _close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str) -> None:
    # fp32 rounding only: the slices' gradients are summed in another order (~2e-6 of their
    # scale), which AdamW's 1/sqrt(v) turns into a few 1e-6 on weights of scale 0.05.
    assert ours.keys() == theirs.keys() and ours, what
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=2e-5, msg=f"{what} {key}")


@pytest.mark.parametrize(("rows", "count"), [(4, 2), (4, 4), (5, 2)])
def test_micro_batched_steps_over_grpc_equal_unsplit_ones(server, tiny_tokenizer, rows, count):
    plain_split, piped_split = tiny_split(), tiny_split()
    batch = _batch(tiny_tokenizer, rows)
    with (
        SplitClient(server, plain_split, optim=OPTIM) as plain,
        SplitClient(server, piped_split, optim=OPTIM, micro_batches=count) as piped,
    ):
        for _ in range(3):
            a, b = plain.train_step(batch), piped.train_step(batch)
            assert b.loss == pytest.approx(a.loss, rel=1e-6) and a.num_targets == b.num_targets
        _close(piped.trunk_adapter(), plain.trunk_adapter(), "trunk")
        stats = piped.stats()
        plain.sync_trunk_adapter()  # the servers' trunk adapters into the local views, for the logits
        piped.sync_trunk_adapter()
    for part in ("head", "tail"):
        _close(adapter_state_dict(getattr(piped_split, part)), adapter_state_dict(getattr(plain_split, part)), part)
    # One call per micro-batch each way.
    assert stats["rpcs"]["forward"]["calls"] == 3 * count == stats["rpcs"]["backward"]["calls"]
    with torch.no_grad():
        logits = [
            fedsea.model.split.central_forward(s.model.eval(), batch.input_ids, batch.lengths)
            for s in (plain_split, piped_split)
        ]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-4)


def test_bad_micro_batch_counts_are_refused_and_a_short_batch_takes_fewer_slices(server, tiny_tokenizer):
    with pytest.raises(ValueError, match="micro_batches"):
        SplitClient(server, tiny_split(), micro_batches=0)
    local, remote = tiny_split(), tiny_split()
    in_process = fedsea.SplitTrainer(local, optim=OPTIM)
    batch = tiny_batch(tiny_tokenizer)  # 3 rows
    with SplitClient(server, remote, optim=OPTIM, micro_batches=4) as client:
        # A batch with fewer rows than micro-batches (an epoch's short last batch) goes in one
        # slice per row: the same step as unsplit, up to fp32 rounding.
        torch.testing.assert_close(
            torch.tensor(client.train_step(batch).loss), torch.tensor(in_process.train_step(batch).loss)
        )
        assert client.trainer is not None
        client.trainer.micro_batches = 1  # and the session goes on unsplit
        torch.testing.assert_close(
            torch.tensor(client.train_step(batch).loss), torch.tensor(in_process.train_step(batch).loss)
        )


def _forward(stub, session_id: str, hidden: torch.Tensor, lengths: list[int], step: int, micro: int, count: int):
    def messages() -> Iterator[pb.ForwardRequest]:
        for i, chunk in enumerate(encode(hidden, pb.FLOAT32)):
            if i == 0:
                yield pb.ForwardRequest(
                    session_id=session_id,
                    step=step,
                    lengths=lengths,
                    hidden=chunk,
                    micro_batch=micro,
                    micro_batches=count,
                )
            else:
                yield pb.ForwardRequest(hidden=chunk)

    return list(stub.Forward(messages()))


def _backward(stub, session_id: str, grad: torch.Tensor, step: int, micro: int, count: int):
    first = pb.BackwardRequest(
        session_id=session_id,
        step=step,
        update=True,
        grad=next(encode(grad, pb.FLOAT32)),
        micro_batch=micro,
        micro_batches=count,
    )
    return list(stub.Backward(iter([first])))


def _refused(call, field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert field in info.value.details()


def test_the_server_refuses_malformed_micro_batches_and_the_session_stays_usable(server, tiny_tokenizer):
    local, remote = tiny_split(), tiny_split()
    in_process = fedsea.SplitTrainer(local, optim=OPTIM)
    batch = tiny_batch(tiny_tokenizer)
    with SplitClient(server, remote, optim=OPTIM) as client:
        connection, session_id = client.require_connection()
        stub = connection.stub
        hidden = torch.randn(1, 5, 64)
        lens = [5]
        _refused(lambda: _forward(stub, session_id, hidden, lens, 0, 2, 2), "micro_batch")  # index out of range
        _refused(lambda: _forward(stub, session_id, hidden, lens, 0, 0, 10_000), "micro_batches")  # > max_batch
        # Slice 0 of 2 arrives; slice 1's backward comes without its forward; slice 0's with another count.
        (answer,) = _forward(stub, session_id, hidden, lens, 0, 0, 2)
        assert answer.micro_batch == 0 and tuple(answer.hidden.shape) == (1, 5, 64)
        _refused(lambda: _backward(stub, session_id, torch.zeros(1, 5, 64), 0, 1, 2), "micro_batch")
        _refused(lambda: _backward(stub, session_id, torch.zeros(1, 5, 64), 0, 0, 3), "micro_batches")
        _refused(lambda: _backward(stub, session_id, torch.zeros(1, 5, 64), 0, 5, 2), "micro_batch")
        # Nothing was applied: the client's step 0 starts over and matches an in-process run.
        for _ in range(2):
            assert client.train_step(batch).loss == in_process.train_step(batch).loss
        served = client.trunk_adapter()
    expected = adapter_state_dict(local.trunk)
    assert all(torch.equal(served[k], expected[k]) for k in expected)


def test_client_batch_mode_refuses_micro_batches(tmp_path, tiny_tokenizer):
    """Client-batch mode joins whole batches and steps the shared trunk once per joint pass: slices are refused."""
    from fedsea.errors import RemoteError
    from fedsea.federation.client import FederatedClient
    from fedsea.federation.config import FedConfig
    from fedsea.federation.coordinator import coordinator_factory
    from fedsea.server.app import ServerThread, TrunkServer
    from fedsea.server.trunk import TrunkHost
    from fedsea.training.data import encode_example
    from tests.integration.conftest import TINY

    lora = fedsea.LoraSpec(r=4, alpha=8, dropout=0.0)
    # A short round: the refused client never submits, and the run should end before the server stops.
    config = FedConfig(rounds=1, local_steps=1, mode="client-batch", expected_clients=1, lora=lora, round_timeout_s=0.5)
    examples = [encode_example(tiny_tokenizer, None, t, 64) for t in TEXTS[:4]]
    server = TrunkServer(TrunkHost(fedsea.tiny_llama(**TINY)), rounds=coordinator_factory(config, tmp_path, False))
    split = fedsea.split_model(fedsea.tiny_llama(**TINY), 1, 1).add_lora(lora)
    with (
        ServerThread(server) as port,
        SplitClient(f"127.0.0.1:{port}", split, optim=OPTIM, micro_batches=2) as client,
    ):
        with pytest.raises(RemoteError) as info:
            FederatedClient(client, examples, 2, "c0").run()
        time.sleep(1.5)  # the round times out and the run ends (no coroutine left waiting at shutdown)
    assert info.value.code == "INVALID_ARGUMENT" and "micro_batches" in str(info.value)


def test_bench_train_times_each_micro_batch_count():
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", "fedsea.cli", "bench", "train", "--model", "tiny-llama", "--batch", "3"]
    cmd += ["--tokens", "16", "--head-layers", "1", "--tail-layers", "1", "--steps", "1", "--warmup", "1"]
    cmd += ["--micro-batches", "1", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["micro_batches"] == 1 and set(result["by_micro_batches"]) == {"1", "2"}
    assert all(row["split_step_s"] > 0 and row["ratio"] > 0 for row in result["by_micro_batches"].values())
    assert result["bytes_ratio"] < 1.02


def test_noise_on_both_cuts_with_micro_batches_over_grpc(server, tiny_tokenizer):
    """Noise on: each slice's h_p and gradient get their own draw; the step runs and learns."""
    noise = fedsea.NoiseConfig(sigma=0.1, seed=9)
    grad_noise = fedsea.NoiseConfig(sigma=1e-4, clip_norm=1e-2, seed=9)
    batch = _batch(tiny_tokenizer, 4)
    with SplitClient(server, tiny_split(), optim=OPTIM, noise=noise, grad_noise=grad_noise, micro_batches=2) as client:
        losses = [client.train_step(batch).loss for _ in range(3)]
        assert client.trainer is not None
        payloads = [client.trainer.privatizer.resend((2, i)) for i in range(2)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert [int(p.shape[0]) for p in payloads] == [2, 2]
