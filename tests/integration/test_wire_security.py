"""TLS, tokens, session isolation, limits and malformed input against a real server."""

from __future__ import annotations

import math
import time

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedsea
from fedsea.client.connection import ClientTls
from fedsea.client.split_client import SplitClient
from fedsea.config import ServerLimits
from fedsea.errors import RemoteError
from fedsea.model.fingerprint import model_fingerprint
from fedsea.server.app import ServerThread, ServerTls, TrunkServer
from fedsea.server.trunk import TrunkHost
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire import fedsea_pb2_grpc as pb_grpc
from fedsea.wire.auth import TokenStore
from fedsea.wire.certs import make_test_certs
from fedsea.wire.tensors import encode
from tests.integration.conftest import TINY, tiny_batch, tiny_split

OPTIM = fedsea.OptimConfig(lr=1e-2)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_test_certs(tmp_path_factory.mktemp("certs"), client_name="clinic-a")


def _open(stub, metadata=(), p=2, q=1, dtype=pb.FLOAT32):
    fingerprint = model_fingerprint(fedsea.tiny_llama(**TINY))
    request = pb.OpenSessionRequest(
        base_fingerprint=fingerprint,
        head_layers=p,
        tail_layers=q,
        trunk_lora=pb.LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj"]),
        optimizer=pb.OptimizerConfig(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8),
        wire_dtype=dtype,
    )
    return stub.OpenSession(request, metadata=metadata, timeout=30)


def _forward(stub, session_id, hidden, lengths, metadata=(), step=0, dtype=pb.FLOAT32):
    chunks = list(encode(hidden, dtype))
    requests = [pb.ForwardRequest(session_id=session_id, step=step, lengths=lengths, hidden=chunks[0])]
    requests += [pb.ForwardRequest(hidden=c) for c in chunks[1:]]
    return list(stub.Forward(iter(requests), metadata=metadata, timeout=30))


def _code(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_tls_handshake_and_training(make_server, certs, tiny_tokenizer):
    tls = ServerTls(certs.server_cert, certs.server_key)
    with make_server(tls=tls) as address:
        with SplitClient(address, tiny_split(), optim=OPTIM, tls=ClientTls(ca=certs.ca_cert)) as client:
            assert client.train_step(tiny_batch(tiny_tokenizer)).loss > 0
        # A client that does not trust the server's CA cannot connect.
        with pytest.raises(RemoteError, match="UNAVAILABLE"):
            SplitClient(address, tiny_split(), tls=ClientTls(ca=certs.client_cert), retries=0).connect()
        # Nor can a plaintext client.
        with pytest.raises(RemoteError, match="UNAVAILABLE"):
            SplitClient(address, tiny_split(), retries=0).connect()


def test_mutual_tls_requires_a_client_certificate(make_server, certs, tiny_tokenizer):
    tls = ServerTls(certs.server_cert, certs.server_key, client_ca=certs.ca_cert)
    with make_server(tls=tls) as address:
        mutual = ClientTls(ca=certs.ca_cert, cert=certs.client_cert, key=certs.client_key)
        with SplitClient(address, tiny_split(), optim=OPTIM, tls=mutual) as client:
            assert client.train_step(tiny_batch(tiny_tokenizer)).loss > 0
            assert client.stats()["server"]["forward"]["calls"] == 1  # named by its certificate
        with pytest.raises(RemoteError, match="UNAVAILABLE"):
            SplitClient(address, tiny_split(), tls=ClientTls(ca=certs.ca_cert), retries=0).connect()


def test_tokens_authenticate_and_sessions_are_private(make_server):
    store = TokenStore()
    alice, bob = store.add("alice"), store.add("bob")
    with make_server(tokens=store) as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TrunkStub(channel)
        as_alice, as_bob = (("authorization", f"Bearer {alice}"),), (("authorization", f"Bearer {bob}"),)
        assert _code(lambda: _open(stub))[0] == grpc.StatusCode.UNAUTHENTICATED
        code, details = _code(lambda: _open(stub, (("authorization", "Bearer nope"),)))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "unknown token" in details
        session = _open(stub, as_alice).session_id
        hidden, lengths = torch.randn(2, 5, 64), [5, 3]
        # Bob cannot use, read, or close Alice's session: to him it does not exist.
        for call in (
            lambda: _forward(stub, session, hidden, lengths, as_bob),
            lambda: list(stub.GetTrunkAdapter(pb.AdapterRequest(session_id=session), metadata=as_bob)),
            lambda: stub.CloseSession(pb.CloseSessionRequest(session_id=session), metadata=as_bob),
        ):
            code, details = _code(call)
            assert code == grpc.StatusCode.NOT_FOUND and session in details
        assert _forward(stub, session, hidden, lengths, as_alice)[0].hidden.shape == [2, 5, 64]
        assert stub.GetStats(pb.StatsRequest(), metadata=as_bob).open_sessions == 0
        assert stub.GetStats(pb.StatsRequest(), metadata=as_alice).open_sessions == 1


def test_token_file_stores_only_hashes(tmp_path):
    store = TokenStore()
    token = store.add("clinic-a")
    store.save(tmp_path / "tokens.json")
    text = (tmp_path / "tokens.json").read_text()
    assert token not in text and "sha256:" in text
    assert TokenStore.load(tmp_path / "tokens.json").authenticate(token) == "clinic-a"
    assert (tmp_path / "tokens.json").stat().st_mode & 0o077 == 0


def test_base_model_mismatch_is_refused_clearly(server):
    other = fedsea.split_model(fedsea.tiny_llama(**{**TINY, "seed": 5}), 2, 1).add_lora(fedsea.LoraSpec(r=2))
    with pytest.raises(RemoteError, match="FAILED_PRECONDITION: base model mismatch"):
        SplitClient(server, other).connect()


@pytest.mark.parametrize("kind", ["random", "folder"])
def test_a_different_seed_or_checkpoint_is_refused(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSEA_CACHE", str(tmp_path / "cache"))
    if kind == "random":
        served, other = "random:llama-tiny", "random:llama-tiny?seed=1"
    else:
        served, other = str(tmp_path / "a"), str(tmp_path / "b")
        fedsea.tiny_llama(**TINY).save_pretrained(served)
        fedsea.tiny_llama(**{**TINY, "seed": 1}).save_pretrained(other)
    thread = ServerThread(TrunkServer(TrunkHost(fedsea.load_model(served))))
    address = f"localhost:{thread.start()}"
    try:
        # The same base model in another dtype is the same model: accepted.
        same = fedsea.split_model(fedsea.load_model(served, dtype="bfloat16"), 1, 1).add_lora(fedsea.LoraSpec(r=2))
        with SplitClient(address, same) as client:
            assert client.connection is not None
        different = fedsea.split_model(fedsea.load_model(other), 1, 1).add_lora(fedsea.LoraSpec(r=2))
        with pytest.raises(RemoteError, match="FAILED_PRECONDITION: base model mismatch"):
            SplitClient(address, different).connect()
    finally:
        thread.stop()


def test_limits_are_enforced(make_server, tiny_tokenizer):
    limits = ServerLimits(max_seq_len=8, max_batch=2, max_sessions_per_client=2, max_message_bytes=64 * 1024)
    with make_server(limits) as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TrunkStub(channel)
        first, _second = _open(stub).session_id, _open(stub).session_id
        code, details = _code(lambda: _open(stub))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_sessions_per_client=2" in details
        code, details = _code(lambda: _forward(stub, first, torch.randn(2, 9, 64), [9, 9]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_seq_len=8" in details
        code, details = _code(lambda: _forward(stub, first, torch.randn(3, 4, 64), [4, 4, 4]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_batch=2" in details
        oversized = pb.ForwardRequest(session_id=first, lengths=[1], hidden=pb.TensorChunk(data=b"\0" * 70_000))
        code, _ = _code(lambda: list(stub.Forward(iter([oversized]), timeout=30)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # After all that, the session still works.
        assert _forward(stub, first, torch.randn(2, 8, 64), [8, 2])[0].step == 0


def test_idle_sessions_are_closed_and_freed(make_server):
    with make_server(ServerLimits(idle_timeout_s=0.3)) as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TrunkStub(channel)
        session = _open(stub).session_id
        assert stub.GetStats(pb.StatsRequest()).open_sessions == 1
        deadline = time.monotonic() + 10
        while stub.GetStats(pb.StatsRequest()).open_sessions and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stub.GetStats(pb.StatsRequest()).open_sessions == 0
        assert _code(lambda: _forward(stub, session, torch.randn(1, 2, 64), [2]))[0] == grpc.StatusCode.NOT_FOUND


def test_out_of_order_steps_fail_cleanly(server):
    with grpc.insecure_channel(server) as channel:
        stub = pb_grpc.TrunkStub(channel)
        session = _open(stub).session_id
        code, details = _code(lambda: _forward(stub, session, torch.randn(1, 2, 64), [2], step=5))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "expects step 0" in details
        grad = next(encode(torch.randn(1, 2, 64), pb.FLOAT32))
        request = pb.BackwardRequest(session_id=session, step=0, update=True, grad=grad)
        code, details = _code(lambda: list(stub.Backward(iter([request]))))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "without its forward" in details


def test_a_resent_backward_does_not_step_twice(server, tiny_tokenizer):
    once, twice = tiny_split(), tiny_split()
    batch = tiny_batch(tiny_tokenizer)
    with SplitClient(server, once, optim=OPTIM) as a, SplitClient(server, twice, optim=OPTIM) as b:
        a.train_step(batch)
        assert b.trainer is not None
        link = b.trainer.trunk
        h = twice.head(batch.input_ids, batch.lengths).detach()
        out = link.forward(h, batch.lengths)
        grad = torch.ones_like(out) * 1e-3
        first = link.backward(grad)
        link.step -= 1  # resend the same step, as a retry after a lost answer would
        second = link.backward(grad)
        assert torch.equal(first, second)
        # One update happened, not two: a third client's single step gives the same adapter.
        after = b.trunk_adapter()
        with SplitClient(server, tiny_split(), optim=OPTIM) as c:
            assert c.trainer is not None
            c.trainer.trunk.forward(h, batch.lengths)
            c.trainer.trunk.backward(grad)
            reference = c.trunk_adapter()
    assert all(torch.equal(after[k], reference[k]) for k in reference)


FIELDS = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([0, 1, 2, 3, 7, -1 & 0x7FFFFFFF]),
        "shape": st.lists(st.integers(-3, 70), min_size=0, max_size=4),
        "nbytes": st.integers(0, 5000),
        "total": st.one_of(st.none(), st.integers(0, 1 << 62)),
        "offset": st.integers(0, 64),
        "lengths": st.lists(st.integers(0, 1 << 31), max_size=5),
        "session": st.sampled_from(["good", "other", ""]),
        "step": st.integers(0, 3),
        "poison": st.sampled_from([None, "nan", "inf"]),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=FIELDS)
def test_fuzzed_forward_requests_get_clear_errors_and_break_nothing(fuzz_server, fields):
    _, session, stub = fuzz_server
    data = bytes(fields["nbytes"])
    shape = fields["shape"]
    if fields["poison"] and fields["dtype"] == 1 and len(shape) == 3 and shape[2] == 64 and min(shape) > 0:
        t = torch.randn(*shape)
        t.view(-1)[0] = float(fields["poison"])
        data = t.numpy().tobytes()
    total = fields["total"] if fields["total"] is not None else len(data)
    chunk = pb.TensorChunk(dtype=fields["dtype"], shape=shape, offset=fields["offset"], data=data, total_bytes=total)
    sid = {"good": session, "other": "no-such-session", "": ""}[fields["session"]]
    request = pb.ForwardRequest(session_id=sid, step=fields["step"], lengths=fields["lengths"], hidden=chunk)
    try:
        list(stub.Forward(iter([request]), timeout=30))
    except grpc.RpcError as err:
        assert err.code() in {
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.FAILED_PRECONDITION,
        }, (err.code(), err.details())
        assert err.details()
        if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
            assert err.details().split(":")[0] in {"hidden", "lengths", "request"}, err.details()
    else:
        # Only a well-formed request may succeed.
        assert fields["session"] == "good" and fields["dtype"] == 1 and len(shape) == 3
        assert total == math.prod(shape) * 4


@pytest.fixture(scope="module")
def fuzz_server():
    from tests.integration.conftest import running_server

    with running_server() as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TrunkStub(channel)
        yield address, _open(stub).session_id, stub


def test_after_the_fuzzing_a_good_client_is_served_exactly(fuzz_server, tiny_tokenizer):
    address, _, _ = fuzz_server
    local, remote = tiny_split(), tiny_split()
    batch = tiny_batch(tiny_tokenizer)
    with SplitClient(address, remote, optim=OPTIM) as client:
        assert client.train_step(batch).loss == fedsea.SplitTrainer(local, optim=OPTIM).train_step(batch).loss


def test_plaintext_on_a_public_address_is_refused():
    with pytest.raises(ValueError, match=r"refusing to serve plaintext on '0\.0\.0\.0'"):
        TrunkServer.check_bind("0.0.0.0", None, insecure=False)
    TrunkServer.check_bind("0.0.0.0", None, insecure=True)
    TrunkServer.check_bind("127.0.0.1", None, insecure=False)
    TrunkServer.check_bind("::1", None, insecure=False)
