"""A ClientApp participant cached in a Ray worker keeps its trunk session between the rounds it
serves; while other workers serve its client, the trunk server may close that session as idle
(``idle_timeout_s``, 600 s: a SmolLM2 run on 2 busy cores lost client-2 from its round 4 so).
The next round in that worker must rebuild the participant, not fail. The real ClientApp
function, a real trunk server (in this process, TLS, tokens), the tiny model."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedsea.client.staging import TrunkOperator
from fedsea.federation.initial import initial_global_state
from fedsea.federation.simulate import prepare_run
from fedsea.flower import client_app
from fedsea.flower.records import head_tail_slice, metrics_of, to_record
from fedsea.flower.settings import FlowerRun
from fedsea.flower.trunk import find_or_start_trunk

RUN = """
[model]
source = "tiny-llama"
[task]
name = "sst2"
train_limit = 16
eval_limit = 4
[federation]
clients = 2
rounds = 2
local_steps = 1
[client]
head_layers = 1
tail_layers = 1
batch_size = 2
max_length = 32
[noise]
sigma = 0.0
"""


def test_a_cached_participant_whose_session_the_server_closed_is_rebuilt(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):  # what a SuperNode's process has (Messages need it)
        monkeypatch.setattr(TaskIdentity, name, 1)
    (tmp_path / "run.toml").write_text(RUN)
    config = {"run-file": str(tmp_path / "run.toml"), "run-dir": str(tmp_path / "run")}
    run = FlowerRun.from_config(config)
    plan = run.plan()
    prepare_run(plan, tmp_path / "run")
    endpoint = find_or_start_trunk(run, plan, tmp_path / "run")
    context = Context(run_id=5, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config=config)
    try:
        assert endpoint.host is not None
        state = initial_global_state(endpoint.host, plan.fed)
        mine = head_tail_slice(state, endpoint.host.num_layers, 1, 1)
        with TrunkOperator(endpoint.address, endpoint.operator_token, tls=endpoint.tls) as operator:
            for round_number in (1, 2):
                key = f"run-5/round-{round_number}"
                operator.stage(key, state)
                settings = {"stage-key": key, "trunk-address": endpoint.address, "local-steps": 1,
                            "server-round": round_number}  # fmt: skip
                msg = Message(
                    RecordDict({"arrays": to_record(mine), "config": ConfigRecord(settings)}),
                    dst_node_id=1, message_type=MessageType.TRAIN,
                )  # fmt: skip
                reply = client_app.train(msg, context)
                assert metrics_of(reply)["num-examples"] == 2
                assert operator.collect(key, ["client-0"], drop=True).keys() == {"client-0"}
                if round_number == 1:  # the server closes the idle session (as after 600 s)
                    assert len(endpoint.host.reap_idle(now=time.monotonic() + 1e6)) == 1
    finally:
        client_app._close_participants()
        endpoint.close()
