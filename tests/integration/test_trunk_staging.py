"""Trunk staging for Flower runs: the operator stages the global trunk adapter on the trunk server,
clients load their trunk blocks from it, train, publish, and the operator collects, with no trunk
adapter bytes on a client. A real server on loopback with tokens (and TLS), the tiny model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
import torch

import fedsea
from fedsea.client import ClientTls, SplitClient, TrunkOperator, load_staged_trunk, publish_trunk
from fedsea.config import ServerLimits
from fedsea.errors import RemoteError
from fedsea.model.adapters import adapter_state_dict
from fedsea.server.app import ServerThread, ServerTls, TrunkServer
from fedsea.server.staging import TrunkStaging
from fedsea.server.trunk import TrunkHost
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire import fedsea_pb2_grpc as pb_grpc
from fedsea.wire.auth import TokenStore
from fedsea.wire.certs import make_test_certs
from tests.integration.conftest import TINY, tiny_batch, tiny_split

KEY = "run-abc/round-3"
OPTIM = fedsea.OptimConfig(lr=1e-2)


@pytest.fixture(scope="module")
def tokens() -> tuple[TokenStore, dict[str, str]]:
    store = TokenStore()
    made = {name: store.add(name) for name in ("alice", "bob")}
    made["ops"] = store.add("ops", role="operator")
    return store, made


@contextmanager
def serving(tokens: TokenStore, limits: ServerLimits | None = None, tls: ServerTls | None = None) -> Iterator[tuple]:
    """(address, the server's staging store) of a real server on loopback."""
    server = TrunkServer(TrunkHost(fedsea.tiny_llama(**TINY), limits), tokens=tokens, tls=tls)
    with ServerThread(server) as port:
        yield f"localhost:{port}", server.servicer.staging


def global_trunk(seed: int = 7) -> dict[str, torch.Tensor]:
    """A global adapter of every block 0..5 (r=4 on q/k/v/o), random: the stage of a round."""
    split = tiny_split(1, 1)
    gen = torch.Generator().manual_seed(seed)
    keys = {**adapter_state_dict(split.head), **adapter_state_dict(split.trunk), **adapter_state_dict(split.tail)}
    return {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in keys.items()}


def _code(exc: pytest.ExceptionInfo[RemoteError]) -> str:
    return exc.value.code


def test_stage_load_train_publish_collect_and_drop(tokens, tmp_path, tiny_tokenizer):
    store, token = tokens
    certs = make_test_certs(tmp_path / "certs")
    tls = ClientTls(ca=certs.ca_cert)
    stage = global_trunk()
    with serving(store, tls=ServerTls(certs.server_cert, certs.server_key)) as (address, staging):
        staging: TrunkStaging
        with TrunkOperator(address, token=token["ops"], tls=tls, chunk_bytes=512) as op:  # 2 chunks a tensor
            op.stage(KEY, stage)
            assert staging.counts() == (1, 0)
            clients = {
                "alice": SplitClient(address, tiny_split(1, 1), optim=OPTIM, tls=tls, token=token["alice"]),
                "bob": SplitClient(address, tiny_split(2, 2), optim=OPTIM, tls=tls, token=token["bob"]),
            }
            trained = {}
            try:
                for name, client in clients.items():
                    client.connect()
                    blocks = range(client.split.head_layers, TINY["num_layers"] - client.split.tail_layers)
                    mine = {k: v for k, v in stage.items() if int(k.split(".")[1]) in blocks}
                    assert load_staged_trunk(client, KEY) == len(mine) == 8 * len(blocks)
                    loaded = client.trunk_adapter()  # exactly the stage's tensors of its trunk blocks
                    assert loaded.keys() == mine.keys()
                    assert all(torch.equal(loaded[k], mine[k]) for k in mine)
                    assert staging.start(str(client.session_id))[0] == KEY
                    client.train_step(tiny_batch(tiny_tokenizer))
                    assert publish_trunk(client, KEY) == len(mine)
                    trained[name] = client.trunk_adapter()
                    assert any(not torch.equal(trained[name][k], mine[k]) for k in mine)  # it trained
                assert staging.held_bytes() > 0
                got = op.collect(KEY)
                assert got.keys() == {"alice", "bob"}
                for name in got:  # each client's trained trunk state, as GetTrunkAdapter returns it
                    assert got[name].keys() == trained[name].keys()
                    assert all(torch.equal(got[name][k], trained[name][k]) for k in got[name])
                assert op.collect(KEY, client_ids=["alice", "carol"]).keys() == {"alice"}  # carol: absent
                # A republish replaces the client's state (one per client and key).
                client = clients["alice"]
                client.train_step(tiny_batch(tiny_tokenizer))
                publish_trunk(client, KEY)
                again = op.collect(KEY, ["alice"])["alice"]
                assert all(torch.equal(again[k], v) for k, v in client.trunk_adapter().items())
                assert staging.counts() == (1, 2)
                assert op.collect(KEY, drop=True).keys() == {"alice", "bob"}
                assert op.collect(KEY) == {}
                assert staging.held_bytes() == 0 and staging.counts() == (0, 0)
                assert staging.start(str(client.session_id)) is None  # the stage went, and with it the start
                with pytest.raises(RemoteError) as exc:  # the round is over: a late publish is refused
                    publish_trunk(clients["bob"], KEY)
                assert _code(exc) == "NOT_FOUND"
            finally:
                for client in clients.values():
                    client.close()


def test_refusals_roles_keys_and_shapes(tokens):
    store, token = tokens
    stage = global_trunk()
    with serving(store) as (address, staging):
        with TrunkOperator(address, token=token["alice"]) as not_op:
            for call in (lambda: not_op.stage(KEY, stage), lambda: not_op.collect(KEY)):
                with pytest.raises(RemoteError) as exc:
                    call()
                assert _code(exc) == "PERMISSION_DENIED" and "operator" in exc.value.message
        assert staging.counts() == (0, 0)
        with (
            TrunkOperator(address, token=token["ops"]) as op,
            SplitClient(address, tiny_split(2, 2), token=token["alice"]) as client,
        ):
            with pytest.raises(RemoteError) as exc:
                load_staged_trunk(client, "no/such-stage")
            assert _code(exc) == "NOT_FOUND" and "no/such-stage" in exc.value.message
            with pytest.raises(RemoteError) as exc:
                publish_trunk(client, "no/such-stage")
            assert _code(exc) == "NOT_FOUND"
            missing = "layers.3.self_attn.v_proj.lora_B.weight"  # in the session's blocks [2, 4)
            op.stage(KEY, {k: v for k, v in stage.items() if k != missing})
            with pytest.raises(RemoteError) as exc:
                load_staged_trunk(client, KEY)
            assert _code(exc) == "INVALID_ARGUMENT" and missing in exc.value.message
            wrong = "layers.2.self_attn.q_proj.lora_A.weight"
            op.stage(KEY, {**stage, wrong: torch.zeros(3, 64)})  # replaces the stage of the key
            with pytest.raises(RemoteError) as exc:
                load_staged_trunk(client, KEY)
            assert _code(exc) == "INVALID_ARGUMENT" and wrong in exc.value.message and "(4, 64)" in exc.value.message
            assert staging.counts() == (1, 0) and staging.start(str(client.session_id)) is None
            # The server checks what a client library would: keys, and names of no trunk block.
            with grpc.insecure_channel(address) as channel:
                stub, as_ops = pb_grpc.TrunkStub(channel), (("authorization", f"Bearer {token['ops']}"),)
                request = pb.CollectRequest(key="../" + "x" * 200)
                with pytest.raises(grpc.RpcError) as raw:
                    list(stub.CollectTrunk(request, metadata=as_ops, timeout=30))
                assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(RemoteError) as exc:
                op.stage("k/2", {"lm_head.lora_A.weight": torch.zeros(4, 64)})
            assert _code(exc) == "INVALID_ARGUMENT" and "lm_head" in exc.value.message
            with pytest.raises(RemoteError) as exc:
                op.stage("k/2", {"layers.6.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)})  # 6 blocks: 0..5
            assert _code(exc) == "INVALID_ARGUMENT"
            with pytest.raises(ValueError, match="stage key"):
                load_staged_trunk(client, "bad key!")


def test_limits_max_stages_and_max_staged_bytes(tokens):
    store, token = tokens
    stage = global_trunk()
    size = sum(v.numel() * 4 for v in stage.values())
    limits = ServerLimits(max_stages=2, max_staged_bytes=size * 7 // 4)  # a stage and a trunk copy, not two stages
    with (
        serving(store, limits) as (address, staging),
        TrunkOperator(address, token=token["ops"]) as op,
        SplitClient(address, tiny_split(1, 1), token=token["alice"]) as client,
    ):
        op.stage("a", stage)
        with pytest.raises(RemoteError) as exc:  # two stages would be 2x the bytes
            op.stage("b", stage)
        assert _code(exc) == "RESOURCE_EXHAUSTED" and "max_staged_bytes" in exc.value.message
        small = {k: v for k, v in stage.items() if k.startswith("layers.0.")}
        op.stage("b", small)
        with pytest.raises(RemoteError) as exc:
            op.stage("c", small)
        assert _code(exc) == "RESOURCE_EXHAUSTED" and "max_stages" in exc.value.message
        op.stage("b", small)  # replacing a stage needs no new room
        assert staging.counts() == (2, 0)
        load_staged_trunk(client, "a")
        with pytest.raises(RemoteError) as exc:  # the session's trunk copy (2/3 of the stage) does not fit either
            publish_trunk(client, "a")
        assert _code(exc) == "RESOURCE_EXHAUSTED" and "max_staged_bytes" in exc.value.message
        op.collect("b", drop=True)
        publish_trunk(client, "a")
        assert staging.counts() == (1, 1)
        op.collect("a", drop=True)
        assert staging.held_bytes() == 0


def test_stages_and_published_states_expire_when_idle(tokens):
    store, token = tokens
    stage = global_trunk()
    with (
        serving(store, ServerLimits(idle_timeout_s=1.0)) as (address, staging),
        TrunkOperator(address, token=token["ops"]) as op,
    ):
        op.stage("unused", stage)
        with SplitClient(address, tiny_split(1, 1), token=token["alice"]) as client:
            op.stage(KEY, stage)
            load_staged_trunk(client, KEY)
            publish_trunk(client, KEY)
            # An open session that loaded the stage keeps it past the idle timeout (a long round).
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                client.trunk_adapter()  # keeps the session in use
                time.sleep(0.2)
            assert staging.counts() == (1, 0)  # "unused" and the published state went, the loaded stage stayed
            publish_trunk(client, KEY)
        deadline = time.monotonic() + 10
        while staging.counts() != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert staging.counts() == (0, 0) and staging.held_bytes() == 0
        assert op.collect(KEY) == {}
