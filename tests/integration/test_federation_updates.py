"""Bad updates in a federated run over a real gRPC server: refused, left out, banned; the run goes on.

Two honest clients train through three rounds while four others send what a hostile or
broken participant would: a head tensor with one extra column under a key it may send, finite
values of 3e38, a trunk adapter overwritten with 1e6 (``PutTrunkAdapter``) before an otherwise
plain submission, and a NaN tensor. The run must finish every round with the honest clients, and the
global adapter must be bit-for-bit the one a run of the honest clients alone reaches.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

import pytest
import torch

import fedsea
from fedsea.errors import RemoteError
from fedsea.federation.checkpoint import latest_round, load_round
from fedsea.federation.client import FederatedClient, RoundResult
from fedsea.federation.config import FedConfig
from fedsea.federation.coordinator import coordinator_factory, initial_global_state
from fedsea.federation.strategy import STRATEGIES, FedAvg
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.trunk import TrunkHost
from fedsea.wire.adapters import submit_messages
from fedsea.wire.auth import TokenStore
from tests.integration.conftest import TINY
from tests.integration.test_federation import LORA, OPTIM, _examples

ATTACKS = ("column", "huge", "trunk", "nan")


def _bad_update(kind: str, client: fedsea.SplitClient, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head/tail a malicious client sends, made from the global tensors it was handed."""
    bad = {k: v.clone() for k, v in state.items()}
    if kind == "column":  # one extra column under a head key this client may send: (r, d) -> (r, d + 1)
        key = sorted(k for k in bad if k.startswith("layers.0.") and ".lora_A." in k)[0]
        bad[key] = torch.cat([bad[key], torch.zeros(bad[key].shape[0], 1)], dim=1)
    elif kind == "nan":  # refused by the servicer as the tensor arrives, counted all the same
        key = sorted(bad)[-1]
        bad[key] = torch.full_like(bad[key], float("nan"))
    elif kind == "huge":  # finite, but the square overflows float32; averaged in, the next round sees Inf
        bad = {k: torch.full_like(v, 3e38) for k, v in bad.items()}
    else:  # a plain head/tail, but a trunk adapter of 1e6 written into the session first
        client.put_trunk_adapter({k: torch.full_like(v, 1e6) for k, v in client.trunk_adapter().items()})
    return bad


def _malicious(fed: FederatedClient, kind: str) -> list[str]:
    """Join, and in every round it is selected for send a bad update; rejoin after each refusal.

    Returns the status codes it met in order (the last: how it ended).
    """
    codes: list[str] = []
    connection, _ = fed.client.require_connection()
    try:
        fed.join()
        last = 0
        while True:
            message, state = fed._await(last)
            if message.finished:
                return [*codes, "finished"]
            last = message.round
            if not message.selected:
                continue
            bad = _bad_update(kind, fed.client, state)
            # 900 samples: were it averaged in, it would outweigh the honest clients' 4 each.
            requests = functools.partial(submit_messages, message.round, 900, 0.1, bad)
            try:
                connection.stream("submit", connection.stub.SubmitUpdate, requests)
                codes.append("accepted")
            except RemoteError as err:
                codes.append(err.code)
                fed.join()  # try again in a later round
    except RemoteError as err:
        return [*codes, err.code]


def run_with(tmp: Path, mode: str, attackers: tuple[str, ...], tokenizer) -> tuple[dict[int, list[RoundResult]], dict]:
    """Two honest clients (c0, c1) and one malicious client per attack; their histories and outcomes."""
    names = ["c0", "c1", *(f"bad-{kind}" for kind in attackers)]
    config = FedConfig(
        rounds=3, local_steps=2, mode=mode, expected_clients=len(names), lora=LORA, round_timeout_s=60, max_faults=2
    )
    store = TokenStore()
    tokens = {name: store.add(name) for name in names}
    server = TrunkServer(TrunkHost(fedsea.tiny_llama(**TINY)), tokens=store, rounds=coordinator_factory(config, tmp))
    histories: dict[int, list[RoundResult]] = {}
    outcomes: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    # Built here, not in the threads: the tiny model's weights come from the global torch RNG.
    splits = [fedsea.split_model(fedsea.tiny_llama(**TINY), 1, 1).add_lora(LORA) for _ in names]
    with ServerThread(server) as port:

        def go(i: int, name: str) -> None:
            try:
                with fedsea.SplitClient(f"127.0.0.1:{port}", splits[i], token=tokens[name], optim=OPTIM) as client:
                    fed = FederatedClient(client, _examples(tokenizer, i % 3), 2, name)
                    if name.startswith("bad-"):
                        outcomes[name] = _malicious(fed, name.removeprefix("bad-"))
                    else:
                        histories[i] = fed.run()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=go, args=(i, name)) for i, name in enumerate(names)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    return histories, outcomes


@pytest.mark.parametrize("mode", ["hierarchical", "sequential"])
def test_bad_updates_are_refused_and_the_run_ends_as_with_the_honest_clients_alone(tmp_path, tiny_tokenizer, mode):
    honest, _ = run_with(tmp_path / "honest", mode, (), tiny_tokenizer)
    mixed, outcomes = run_with(tmp_path / "mixed", mode, ATTACKS, tiny_tokenizer)

    # The honest clients played every round, in both runs.
    for histories in (honest, mixed):
        assert sorted(histories) == [0, 1]
        assert all([r.round for r in h if r.selected and r.submitted] == [1, 2, 3] for h in histories.values())
    # Each attacker was refused (INVALID_ARGUMENT) twice, then banned (PERMISSION_DENIED).
    assert outcomes == {f"bad-{k}": ["INVALID_ARGUMENT", "INVALID_ARGUMENT", "PERMISSION_DENIED"] for k in ATTACKS}

    records = [json.loads(line) for line in (tmp_path / "mixed" / "server_rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(r["submitted"] == ["c0", "c1"] and r["dropped"] == [] for r in records)
    refused = records[0]["refused"]
    assert sorted(refused) == ["bad-column", "bad-huge", "bad-nan", "bad-trunk"]
    assert "update[layers.0." in refused["bad-column"] and "expected shape" in refused["bad-column"]
    assert "over the bound" in refused["bad-huge"] and "trunk adapter[layers.1." in refused["bad-trunk"]
    assert "contains NaN or Inf" in refused["bad-nan"]
    assert records[-1]["banned"] == ["bad-column", "bad-huge", "bad-nan", "bad-trunk"]

    # The global adapter is the honest clients' average, as if the others had never been there.
    for number in (1, 2, 3):
        _, expected, _, _ = load_round(tmp_path / "honest" / "checkpoints" / f"round-{number:04d}")
        _, got, _, _ = load_round(tmp_path / "mixed" / "checkpoints" / f"round-{number:04d}")
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), f"round {number} differs"
    assert latest_round(tmp_path / "mixed").name == "round-0003"


class _Broken(FedAvg):
    """A strategy whose aggregation fails: what a bug, or an update no check foresaw, would do."""

    def aggregate(self, updates, current):
        raise RuntimeError("aggregation failed")


@pytest.mark.parametrize("strategy", ["fedavg", "broken"])
def test_a_closed_session_or_a_failing_aggregation_ends_no_run(tmp_path, tiny_tokenizer, monkeypatch, strategy):
    """c2 closes its session after round 1 (still a member when round 2 starts); "broken" fails every aggregation."""
    monkeypatch.setitem(STRATEGIES, "broken", _Broken)
    # FedConfig checks the name against the torch-free list the CLI's parser also reads.
    monkeypatch.setattr(fedsea.federation.config, "STRATEGY_NAMES", (*STRATEGIES,))
    config = FedConfig(rounds=3, local_steps=2, mode="hierarchical", expected_clients=3, lora=LORA, strategy=strategy)
    store = TokenStore()
    tokens = [store.add(f"c{i}") for i in range(3)]
    splits = [fedsea.split_model(fedsea.tiny_llama(**TINY), 1, 1).add_lora(LORA) for _ in range(3)]
    server = TrunkServer(
        TrunkHost(fedsea.tiny_llama(**TINY)), tokens=store, rounds=coordinator_factory(config, tmp_path)
    )
    histories: dict[int, list[RoundResult]] = {}
    errors: list[BaseException] = []
    closed = threading.Event()  # c2 has closed its session (after its round-1 update)

    with ServerThread(server) as port:

        def go(i: int) -> None:
            def on_step(round_number: int, step: int, loss: float) -> None:
                if i < 2 and (round_number, step) == (1, 0):  # round 1 stays open until c2's session is gone
                    assert closed.wait(timeout=60)

            def on_round(result: RoundResult) -> None:
                if i == 2:
                    raise KeyboardInterrupt  # leaves, closing its session: still a member for round 2

            try:
                with fedsea.SplitClient(f"127.0.0.1:{port}", splits[i], token=tokens[i], optim=OPTIM) as client:
                    fed = FederatedClient(client, _examples(tiny_tokenizer, i), 2, f"c{i}", on_step, on_round=on_round)
                    histories[i] = fed.run()
            except KeyboardInterrupt:
                closed.set()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    # Every round played by the two that stayed.
    assert all([r.round for r in histories[i] if r.selected and r.submitted] == [1, 2, 3] for i in (0, 1))
    records = [json.loads(line) for line in (tmp_path / "server_rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3] and records[0]["submitted"] == ["c0", "c1", "c2"]
    assert records[1]["submitted"] == ["c0", "c1"] and records[1]["dropped"] == ["c2"]  # its session was gone
    _, state, _, _ = load_round(latest_round(tmp_path))
    initial = initial_global_state(TrunkHost(fedsea.tiny_llama(**TINY)), config)
    unchanged = all(torch.equal(state[k], initial[k]) for k in initial)
    assert unchanged == (strategy == "broken")  # "broken": no round could be aggregated
