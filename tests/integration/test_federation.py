"""Federated rounds over a real gRPC server on loopback, clients in threads."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest
import torch

import fedsea
from fedsea.federation.checkpoint import latest_round, load_round
from fedsea.federation.client import FederatedClient
from fedsea.federation.config import FedConfig
from fedsea.federation.coordinator import coordinator_factory, initial_global_state
from fedsea.model.adapters import adapter_state_dict
from fedsea.model.seeding import seeded
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.trunk import TrunkHost
from fedsea.training.data import encode_example
from fedsea.wire.auth import TokenStore
from tests.integration.conftest import TINY

LORA = fedsea.LoraSpec(r=4, alpha=8, dropout=0.0)
OPTIM = fedsea.OptimConfig(lr=1e-2)
TEXTS = [
    ["The movie was a delight.", "Sharp writing and warm performances.", "A joy."],
    ["Dull and slow.", "The plot is thin and the jokes fall flat.", "Boring."],
    ["The council approved a new park.", "The bank reported higher revenue.", "Rain today."],
]


def _examples(tokenizer, i):
    return [encode_example(tokenizer, None, t, 64) for t in TEXTS[i]] * 3


def run_federation(
    tmp: Path,
    config: FedConfig,
    partitions,
    tokenizer,
    resume=False,
    die: set[int] = frozenset(),
    stall=None,
    gate=None,
    lora=LORA,
):
    """Clients with partition points ``partitions`` train through a federated server; returns histories."""
    store = TokenStore()
    tokens = [store.add(f"c{i}") for i in range(len(partitions))]
    splits = [fedsea.split_model(fedsea.tiny_llama(**TINY), p, q).add_lora(lora) for p, q in partitions]
    histories: dict[int, list] = {}
    errors: list[BaseException] = []
    refused = threading.Event()
    server = TrunkServer(
        TrunkHost(fedsea.tiny_llama(**TINY)), tokens=store, rounds=coordinator_factory(config, tmp, resume)
    )
    with ServerThread(server) as port:

        def go(i: int) -> None:
            def on_step(round_number: int, step: int, loss: float) -> None:
                if i in die and step == 1:
                    raise KeyboardInterrupt("killed mid-round")
                if stall is not None and (i, round_number, step) == stall[:3]:
                    time.sleep(stall[3])
                if gate is not None and (i, round_number, step) == gate:
                    assert refused.wait(timeout=60), "no client was refused"

            def on_round(result) -> None:
                if not result.submitted:
                    refused.set()  # set after the late client has joined again

            try:
                with fedsea.SplitClient(f"127.0.0.1:{port}", splits[i], token=tokens[i], optim=OPTIM) as client:
                    fed = FederatedClient(
                        client, _examples(tokenizer, i % 3), 2, f"c{i}", on_step=on_step, on_round=on_round
                    )
                    histories[i] = fed.run()
            except KeyboardInterrupt:
                histories[i] = []
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(partitions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not errors, errors
    return histories


def _mean_loss(history, round_number):
    losses = [loss for h in history for r in h if r.round == round_number and r.selected for loss in r.losses]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("mode", ["hierarchical", "sequential", "client-batch"])
def test_two_clients_two_rounds_lower_the_loss_with_mixed_partitions(tmp_path, tiny_tokenizer, mode):
    config = FedConfig(rounds=2, local_steps=4, mode=mode, expected_clients=2, lora=LORA, round_timeout_s=120)
    histories = run_federation(tmp_path, config, [(1, 1), (2, 2)], tiny_tokenizer)
    assert _mean_loss(histories.values(), 2) < _mean_loss(histories.values(), 1)
    _, state, _, _ = load_round(latest_round(tmp_path))
    initial = initial_global_state(TrunkHost(fedsea.tiny_llama(**TINY)), config)
    assert state.keys() == initial.keys()
    # Every block's adapter moved: heads, tails and trunks of both clients were averaged in.
    layers = {int(k.split(".")[1]) for k in state if not torch.equal(state[k], initial[k])}
    assert layers == set(range(6))


def test_per_part_lora_trains_and_the_global_adapter_has_each_parts_rank(tmp_path, tiny_tokenizer):
    edge = fedsea.LoraSpec(r=8, alpha=16, dropout=0.0)
    parts = fedsea.SplitLora(head=edge, trunk=dataclasses.replace(edge, r=16), tail=edge)
    config = FedConfig(rounds=1, local_steps=2, mode="hierarchical", expected_clients=2, lora=parts, cut=(1, 1))
    histories = run_federation(tmp_path, config, [(1, 1), (1, 1)], tiny_tokenizer, lora=parts)
    trained = [r for h in histories.values() for r in h if r.selected]
    assert len(trained) == 2 and all(len(r.losses) == 2 for r in trained)
    _, state, _, _ = load_round(latest_round(tmp_path))
    # Blocks 0 and 5 are the head and the tail (r = 8), blocks 1-4 the trunk (r = 16).
    rows = {int(k.split(".")[1]): v.shape[0] for k, v in state.items() if ".lora_A." in k}
    assert rows == {0: 8, 1: 16, 2: 16, 3: 16, 4: 16, 5: 8}
    initial = initial_global_state(TrunkHost(fedsea.tiny_llama(**TINY)), config)
    assert state.keys() == initial.keys()
    assert {int(k.split(".")[1]) for k in state if not torch.equal(state[k], initial[k])} == set(range(6))
    # The initial adapter is what a SplitModel cut there draws under the run's seed (the centralized baseline's).
    split = fedsea.split_model(fedsea.tiny_llama(**TINY), 1, 1)
    with seeded(config.seed):
        split.add_lora(parts)
    drawn = {k: v for part in split.parts().values() for k, v in adapter_state_dict(part).items()}
    assert drawn.keys() == initial.keys() and all(torch.equal(drawn[k], initial[k]) for k in drawn)


def test_two_clients_in_client_batch_share_one_trunk_pass(tmp_path, tiny_tokenizer):
    config = FedConfig(rounds=1, local_steps=3, mode="client-batch", expected_clients=2, lora=LORA)
    histories = run_federation(tmp_path, config, [(1, 1), (1, 1)], tiny_tokenizer)
    assert all(len(h[0].losses) == 3 for h in histories.values())


@pytest.mark.parametrize("mode", ["sequential", "client-batch", "hierarchical"])
def test_one_client_follows_the_centralized_loss_curve(tmp_path, tiny_tokenizer, mode):
    config = FedConfig(rounds=1, local_steps=5, mode=mode, expected_clients=1, lora=LORA)
    histories = run_federation(tmp_path, config, [(2, 1)], tiny_tokenizer)
    federated = histories[0][0].losses
    # The centralized baseline: same initial adapter, same batches, same optimizer, unsplit model.
    central = fedsea.split_model(fedsea.tiny_llama(**TINY), 2, 1).add_lora(LORA)
    initial = initial_global_state(TrunkHost(fedsea.tiny_llama(**TINY)), config)
    for part in central.parts().values():
        fedsea.model.adapters.load_adapter_state_dict(part, initial, strict=False)
    trainer = fedsea.CentralTrainer(central, optim=OPTIM)
    probe = FederatedClient.__new__(FederatedClient)  # reuse its seeded batch order, no connection needed
    probe.examples, probe.batch_size, probe.name, probe.info = _examples(tiny_tokenizer, 0), 2, "c0", None
    probe.seed = 0  # the run seed a FederatedClient holds before its join (FedConfig.seed)
    probe.client = type("C", (), {"split": central})()
    losses = [trainer.train_step(b).loss for b in FederatedClient._batches(probe, 1, 5)]
    assert federated == pytest.approx(losses, rel=1e-4)


def test_resume_gives_bit_identical_adapters(tmp_path, tiny_tokenizer):
    straight = FedConfig(rounds=2, local_steps=3, mode="hierarchical", expected_clients=2, lora=LORA)
    run_federation(tmp_path / "a", straight, [(1, 1), (2, 1)], tiny_tokenizer)
    _, expected, _, _ = load_round(latest_round(tmp_path / "a"))
    first_half = FedConfig(rounds=1, local_steps=3, mode="hierarchical", expected_clients=2, lora=LORA)
    run_federation(tmp_path / "b", first_half, [(1, 1), (2, 1)], tiny_tokenizer)
    assert latest_round(tmp_path / "b").name == "round-0001"
    run_federation(tmp_path / "b", straight, [(1, 1), (2, 1)], tiny_tokenizer, resume=True)
    number, resumed, _, _ = load_round(latest_round(tmp_path / "b"))
    assert number == 2 and resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_a_client_killed_mid_round_does_not_stop_the_round(tmp_path, tiny_tokenizer):
    config = FedConfig(rounds=2, local_steps=3, mode="hierarchical", expected_clients=3, lora=LORA, round_timeout_s=4)
    histories = run_federation(tmp_path, config, [(1, 1), (1, 1), (1, 1)], tiny_tokenizer, die={2})
    assert histories[2] == []
    assert [r.round for r in histories[0] if r.selected] == [1, 2]
    rounds = (tmp_path / "server_rounds.jsonl").read_text().splitlines()
    first = __import__("json").loads(rounds[0])
    assert first["submitted"] == ["c0", "c1"] and first["dropped"] == ["c2"]
    _, state, _, _ = load_round(latest_round(tmp_path))
    assert all(bool(torch.isfinite(v).all()) for v in state.values())


def test_a_client_late_for_a_round_is_left_out_and_takes_part_in_the_next(tmp_path, tiny_tokenizer):
    config = FedConfig(rounds=3, local_steps=2, mode="hierarchical", expected_clients=2, lora=LORA, round_timeout_s=3)
    # c1 stalls past round 1's timeout; c0 holds round 2 open until c1 has been refused and joined again.
    histories = run_federation(tmp_path, config, [(1, 1), (1, 1)], tiny_tokenizer, stall=(1, 1, 0, 5.0), gate=(0, 2, 0))
    late = {r.round: r.submitted for r in histories[1] if r.selected}
    # Refused once (the round had closed), then back in a later round without an error.
    assert late[1] is False and late[max(late)] is True and max(late) > 1, late
    rounds = [json.loads(x) for x in (tmp_path / "server_rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["submitted"] == ["c0"] and rounds[0]["dropped"] == ["c1"]
    assert sorted(rounds[-1]["submitted"]) == ["c0", "c1"]
