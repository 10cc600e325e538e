"""Client-batch groups on the trunk server (Flower runs): a group stage's members train one shared
trunk adapter, their batches joined into one trunk pass per step. A real server on loopback with
tokens, the tiny model, real clients in threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import fedsea
from fedsea.client import SplitClient, TrunkOperator, load_staged_trunk, publish_trunk
from fedsea.errors import RemoteError
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.batching import GROUP_OWNER
from fedsea.server.trunk import TrunkHost
from fedsea.wire.auth import TokenStore
from tests.integration.conftest import TINY, tiny_batch, tiny_split
from tests.integration.test_trunk_staging import global_trunk

OPTIM = fedsea.OptimConfig(lr=1e-2)
GROUP, PLAIN = "run-g/round-1/group-1-5", "run-g/round-1"


@pytest.fixture(scope="module")
def tokens() -> tuple[TokenStore, dict[str, str]]:
    store = TokenStore()
    made = {name: store.add(name) for name in ("alice", "bob", "carol")}
    made["ops"] = store.add("ops", role="operator")
    return store, made


@contextmanager
def serving(store: TokenStore) -> Iterator[tuple[str, TrunkHost]]:
    host = TrunkHost(fedsea.tiny_llama(**TINY))
    with ServerThread(TrunkServer(host, tokens=store)) as port:
        yield f"localhost:{port}", host


@contextmanager
def clients(address: str, token: dict[str, str], cuts: dict[str, tuple[int, int]]) -> Iterator[dict[str, SplitClient]]:
    made = {name: SplitClient(address, tiny_split(*cut), optim=OPTIM, token=token[name]) for name, cut in cuts.items()}
    try:
        for client in made.values():
            client.connect()
        yield made
    finally:
        for client in made.values():
            client.close()


def _train_together(members: list[SplitClient], batch: fedsea.Batch, steps: int) -> list[list[float]]:
    """Each member trains ``steps`` steps in its own thread (a group's steps wait for every member)."""
    losses: list[list[float]] = [[] for _ in members]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            for _ in range(steps):
                losses[i].append(members[i].train_step(batch).loss)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(members))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return losses


def test_a_group_of_one_trains_as_the_plain_stage_does(tokens, tiny_tokenizer):
    store, token = tokens
    stage, batch = global_trunk(), tiny_batch(tiny_tokenizer)
    with serving(store) as (address, _), TrunkOperator(address, token=token["ops"]) as op:
        op.stage(GROUP, stage, group=["alice"], step_timeout_s=30)
        op.stage(PLAIN, stage)
        with clients(address, token, {"alice": (1, 1), "bob": (1, 1)}) as c:
            assert load_staged_trunk(c["alice"], GROUP) == 8 * 4  # the group's trunk blocks 1..4
            load_staged_trunk(c["bob"], PLAIN)
            alone = [c["bob"].train_step(batch).loss for _ in range(3)]
            grouped = [c["alice"].train_step(batch).loss for _ in range(3)]
            publish_trunk(c["bob"], PLAIN)
            shared = op.collect(GROUP, drop=True)
            plain = op.collect(PLAIN, drop=True)["bob"]
    assert grouped == pytest.approx(alone, rel=1e-6)
    assert shared.keys() == {GROUP_OWNER} and shared[GROUP_OWNER].keys() == plain.keys()
    for k, v in plain.items():
        torch.testing.assert_close(shared[GROUP_OWNER][k], v, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(plain[k], stage[k]) for k in plain)  # it trained


def test_members_share_one_trunk_and_others_are_refused(tokens, tiny_tokenizer):
    store, token = tokens
    stage, batch = global_trunk(), tiny_batch(tiny_tokenizer)
    with serving(store) as (address, host), TrunkOperator(address, token=token["ops"]) as op:
        op.stage(GROUP, stage, group=["alice", "bob"], step_timeout_s=60)
        with clients(address, token, {"alice": (1, 1), "bob": (1, 1), "carol": (1, 1)}) as c:
            own = c["alice"].trunk_adapter()  # the session's own adapter, which the group leaves alone
            for name in ("bob", "alice"):  # in any order: the rows are the operator's order
                load_staged_trunk(c[name], GROUP)
            with pytest.raises(RemoteError, match="not one of them") as exc:
                load_staged_trunk(c["carol"], GROUP)
            assert exc.value.code == "INVALID_ARGUMENT"
            with pytest.raises(RemoteError, match="went on without"):  # a second load of a bound member
                load_staged_trunk(c["alice"], GROUP)
            assert host.open_sessions(GROUP_OWNER) == 1
            losses = _train_together([c["alice"], c["bob"]], batch, 3)
            assert all(len(x) == 3 for x in losses) and losses[0] == pytest.approx(losses[1], rel=1e-5)
            assert losses[0][-1] < losses[0][0]  # the shared trunk (and each head and tail) learned
            with pytest.raises(RemoteError, match="collected as a whole") as exc:
                publish_trunk(c["alice"], GROUP)
            assert exc.value.code == "INVALID_ARGUMENT"
            assert all(torch.equal(c["alice"].trunk_adapter()[k], v) for k, v in own.items())
            shared = op.collect(GROUP, drop=True)
            assert shared.keys() == {GROUP_OWNER}
            assert any(not torch.equal(shared[GROUP_OWNER][k], stage[k]) for k in shared[GROUP_OWNER])
            assert host.open_sessions(GROUP_OWNER) == 0  # dropping the stage closed the shared session
            with pytest.raises(RemoteError) as exc:
                load_staged_trunk(c["bob"], GROUP)
            assert exc.value.code == "NOT_FOUND"


def test_another_cut_is_refused_and_a_late_member_is_left_out(tokens, tiny_tokenizer):
    store, token = tokens
    stage, batch = global_trunk(), tiny_batch(tiny_tokenizer)
    with serving(store) as (address, _), TrunkOperator(address, token=token["ops"]) as op:
        op.stage(GROUP, stage, group=["alice", "bob", "carol"], step_timeout_s=1.0)
        with clients(address, token, {"alice": (1, 1), "bob": (2, 2), "carol": (1, 1)}) as c:
            load_staged_trunk(c["alice"], GROUP)
            with pytest.raises(RemoteError, match="a group per cut"):
                load_staged_trunk(c["bob"], GROUP)
            started = time.monotonic()
            loss = c["alice"].train_step(batch).loss  # waits one step timeout for bob and carol, then goes on
            assert time.monotonic() - started >= 0.9 and loss == loss
            c["alice"].train_step(batch)  # the late are out: no more waiting
            with pytest.raises(RemoteError, match="went on without 'carol'"):
                load_staged_trunk(c["carol"], GROUP)
            assert op.collect(GROUP, drop=True).keys() == {GROUP_OWNER}


def test_a_bad_group_is_refused_before_any_load(tokens):
    store, token = tokens
    with serving(store) as (address, _), TrunkOperator(address, token=token["ops"]) as op:
        for members, timeout, why in ((["alice", "alice"], 5.0, "twice"), (["alice"], 0.0, "must be > 0")):
            with pytest.raises(RemoteError, match=why) as exc:
                op.stage(GROUP, global_trunk(), group=members, step_timeout_s=timeout)
            assert exc.value.code == "INVALID_ARGUMENT"
