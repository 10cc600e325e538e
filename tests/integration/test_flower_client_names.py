"""One name per client on Flower runs: the trunk server knows a client by its token's name, the
ServerApp by the run file's; a token named otherwise is refused in one line naming both, never a
round that silently leaves every reply out. A real trunk server on loopback, the tiny model."""

from __future__ import annotations

import pytest

import fedsea
from fedsea.client import SplitClient, TrunkOperator, load_staged_trunk, publish_trunk
from fedsea.flower.runlog import final_line, round_line
from fedsea.flower.trunk import ClientNameError, NamedOperator
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.trunk import TrunkHost
from fedsea.wire.auth import TokenStore
from tests.integration.conftest import TINY, tiny_batch, tiny_split
from tests.integration.test_trunk_staging import global_trunk

KEY = "run-7/round-1"


def test_a_token_named_otherwise_than_its_client_is_refused_naming_both(tiny_tokenizer):
    store = TokenStore()
    token = {name: store.add(name) for name in ("client-0", "hospital-a")}
    ops = store.add("ops", role="operator")
    server = TrunkServer(TrunkHost(fedsea.tiny_llama(**TINY)), tokens=store)
    with ServerThread(server) as port, TrunkOperator(f"localhost:{port}", token=ops) as raw:
        operator = NamedOperator(raw)
        operator.stage(KEY, global_trunk())
        clients = [
            SplitClient(f"localhost:{port}", tiny_split(1, 1), optim=fedsea.OptimConfig(lr=1e-2), token=token[n])
            for n in ("client-0", "hospital-a")
        ]
        try:
            for client in clients:  # a round: load the trunk blocks, train, publish
                client.connect()
                load_staged_trunk(client, KEY)
                client.train_step(tiny_batch(tiny_tokenizer))
                publish_trunk(client, KEY)
            # The run file's clients are client-0 and client-1; the second owner's token is hospital-a.
            with pytest.raises(ClientNameError) as exc:
                operator.collect(KEY, ["client-0", "client-1"], drop=False)
            message = str(exc.value)
            assert "hospital-a" in message and "client-1" in message and "fedsea token add" in message
            assert "\n" not in message
            # With the names right, the states come back under the run file's names.
            got = operator.collect(KEY, ["client-0", "hospital-a"], drop=True)
            assert got.keys() == {"client-0", "hospital-a"}
        finally:
            for client in clients:
                client.close()


def test_round_and_final_lines_name_the_clients_and_say_where_the_report_is():
    record = {"round": 2, "selected": ["client-0", "client-1", "client-2"], "submitted": ["client-0", "client-2"],
              "dropped": ["client-1"], "refused": {}, "failed": {"client-1": "timeout"},
              "losses": {"client-0": 3.0, "client-2": 2.0}, "seconds": 12.34,
              "traffic": {"client-0": [2**20, 2**20], "client-2": [2**19, 2**19]}}  # fmt: skip
    assert round_line(record, 3) == (
        "round 2/3: 2/3 clients replied (client-0, client-2), mean loss 2.5000, 3.0 MiB moved, 12.3 s; "
        "dropped client-1; failed client-1"
    )
    summary = {"rounds_completed": 3, "clients": 3, "metric": "accuracy", "before": 0.5, "after": 0.75,
               "bytes_moved": 3 * 2**20, "report": "/runs/r1/report.md"}  # fmt: skip
    assert final_line(summary) == (
        "run finished: 3 rounds, 3 clients, accuracy 0.5000 -> 0.7500, 3.0 MiB moved; report /runs/r1/report.md"
    )
