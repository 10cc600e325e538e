"""Secure aggregation (SecAgg+) on Flower's Deployment Engine: real ``flower-superlink`` and
``flower-supernode`` processes with TLS and node authentication, a ``fedsea serve`` trunk server
with TLS and tokens. A one-round run with ``secure-aggregation`` completes with both clients, the
ServerApp received masked vectors only (``fedsea.flower.secagg``), and the aggregate moved the
head and tail. That the secure aggregate equals plain FedAvg within the protocol's bound is
tested on the Simulation Engine (``test_flower_secagg.py``), where it costs a fraction of this."""

from __future__ import annotations

import json
from pathlib import Path

from fedsea.experiments.serve_proc import ServeProcess
from fedsea.federation.checkpoint import load_round
from fedsea.flower.template import write_app
from fedsea.wire.auth import TokenStore
from fedsea.wire.certs import make_test_certs
from tests.flower_deploy import deployment
from tests.integration.test_flower_fedsea_deployment import RUN, TEXTS, _secret

NAMES = ("client-0", "client-1")


def test_secure_aggregation_runs_on_the_deployment_engine(tmp_path: Path) -> None:
    operator = tmp_path / "operator"
    certs = make_test_certs(operator / "trunk-certs")
    store = TokenStore()
    op_token = _secret(operator / "operator.token", store.add("flower-serverapp", role="operator"))
    tokens = {name: store.add(name) for name in NAMES}
    store.save(operator / "tokens.json")
    serve_args = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
    trunk = ServeProcess(args=[*serve_args, "--tokens", str(operator / "tokens.json")])
    try:
        app = write_app(tmp_path / "app", run_file=False)
        (app / "run.toml").write_text(RUN)
        nodes: list[dict[str, str | int | float | bool]] = []
        for i, name in enumerate(NAMES):
            owner = tmp_path / f"owner-{i}"
            owner.mkdir()
            rows = [{"text": t} for t in (TEXTS[i::2] * 8)]
            (owner / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            token = _secret(owner / "trunk.token", tokens[name])
            nodes.append({"name": name, "data": str(owner / "train.jsonl"), "state-dir": str(owner / "state"),
                          "token-file": str(token), "tls-ca": str(certs.ca_cert)})  # fmt: skip
        config: dict[str, str | int | float | bool] = {
            "run-file": "run.toml", "set": "federation.rounds=1", "trunk-address": trunk.address,
            "operator-token-file": str(op_token), "tls-ca": str(certs.ca_cert), "evaluate": "none",
        }  # fmt: skip
        with deployment(app, tmp_path / "flower", nodes, tls=True, node_auth=True) as dep:
            run = {**config, "run-dir": str(operator / "secure"), "secure-aggregation": True}
            result = dep.run(app, run, timeout=400)
            assert result.status == "finished:completed", result.output + dep.logs()
            assert "round 1/1: 2/2 clients replied (client-0, client-1)" in result.output, result.output
            processes = dep.track()
    finally:
        trunk.stop()

    record = json.loads((operator / "secure" / "server_rounds.jsonl").read_text().splitlines()[0])
    sa = record["secure-aggregation"]
    assert sorted(record["submitted"]) == list(NAMES)
    assert sa["replies"] == 4 * 2 and sa["failures"] == 0  # four SecAgg+ stages each, masked vectors only
    assert sa["error-bound"] < 1e-5, sa
    secure = load_round(operator / "secure" / "checkpoints" / "round-0001")[1]
    last = max(int(k.split(".")[1]) for k in secure)
    head_tail = [k for k in secure if int(k.split(".")[1]) in (0, last)]  # (p, q) = (1, 1)
    moved = max(secure[k].float().abs().max().item() for k in head_tail if "lora_B" in k)  # B starts at zero
    assert moved > 100 * sa["error-bound"], moved
    assert (operator / "secure" / "report.md").is_file()
    for proc in processes:
        assert not proc.is_running(), f"orphan {proc.pid}"
