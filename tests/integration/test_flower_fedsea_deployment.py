"""fedsea's own Flower app on Flower's Deployment Engine, across (loopback) machines: a plain run,
the same deployment in client-batch mode, and with secure aggregation (SecAgg+).

Everything a real deployment has, each its own process: a ``fedsea serve`` trunk server with TLS
and bearer tokens (started by the operator, found by the ServerApp at ``trunk-address``), a
``flower-superlink`` with TLS and SuperNode authentication, one ``flower-supernode`` per data
owner whose node config names the owner's client, data, token and state folder, and ``flwr run``
of the app folder ``fedsea flower new`` writes. The run file travels inside the app (FAB), as it
must across machines: no party reads a file of another's machine.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import torch

from fedsea.cli.main import main as fedsea_main
from fedsea.experiments.serve_proc import ServeProcess
from fedsea.federation.checkpoint import latest_round, load_round
from fedsea.flower.template import write_app
from fedsea.wire.auth import TokenStore
from fedsea.wire.certs import make_test_certs
from tests.flower_deploy import Deployment, deployment, make_node_keys

RUN = """
[model]
source = "tiny-llama"
[task]
name = "sst2"
eval_limit = 8
[federation]
clients = 2
rounds = 2
local_steps = 3
mode = "hierarchical"
round_timeout_s = 120
join_timeout_s = 60
[optim]
lr = 0.01
[client]
head_layers = 1
tail_layers = 1
batch_size = 4
max_length = 64
[noise]
sigma = 0.0
"""

TEXTS = [
    "the film is a warm and funny delight",
    "a dull and tired story with no life",
    "sharp writing and fine performances",
    "the plot drags and the jokes fall flat",
]


def _secret(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_fedsea_app_on_the_deployment_engine_trains_across_data_owners(tmp_path: Path) -> None:
    t0 = time.monotonic()
    # The operator's machine: the trunk server, its TLS and tokens.
    operator = tmp_path / "operator"
    certs = make_test_certs(operator / "trunk-certs")
    store = TokenStore()
    tokens = {"op": store.add("flower-serverapp", role="operator")}
    tokens |= {name: store.add(name) for name in ("client-0", "client-1")}
    store.save(operator / "tokens.json")
    op_token = _secret(operator / "operator.token", tokens["op"])
    serve_args = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
    # Two sessions per client at most: a ClientApp process that left its trunk session open (one
    # process per Flower message: query, round 1, round 2) would be refused its third.
    serve_args += ["--tokens", str(operator / "tokens.json"), "--max-sessions-per-client", "2"]
    trunk = ServeProcess(args=serve_args)
    try:
        # The app folder (fedsea flower new): the run file ships in it, to every SuperNode.
        app = write_app(tmp_path / "app", run_file=False)
        (app / "run.toml").write_text(RUN)
        run_dir = operator / "run"
        # Each data owner's machine: its data, its token, the trunk's CA, its state folder.
        nodes: list[dict[str, str | int | float | bool]] = []
        for i, name in enumerate(("client-0", "client-1")):
            owner = tmp_path / f"owner-{i}"
            owner.mkdir()
            rows = [{"text": t} for t in (TEXTS[i::2] * 8)]
            (owner / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            ca = owner / "trunk-ca.pem"
            ca.write_bytes(certs.ca_cert.read_bytes())
            token = _secret(owner / "trunk.token", tokens[name])
            nodes.append({"name": name, "data": str(owner / "train.jsonl"), "state-dir": str(owner / "state"),
                          "token-file": str(token), "tls-ca": str(ca)})  # fmt: skip
        # A third data owner whose node config names no client of the run file: its ClientApp
        # fails the query, the ServerApp says so in one line, and the run goes on without it.
        nodes.append({**nodes[1], "name": "client-9", "state-dir": str(tmp_path / "owner-9" / "state")})
        with deployment(app, tmp_path / "flower", nodes, tls=True, node_auth=True) as dep:
            t_up = time.monotonic() - t0
            _check_node_auth(dep, tmp_path)
            config: dict[str, str | int | float | bool] = {
                "run-file": "run.toml",  # relative: the app folder's (the installed FAB's) on every machine
                "run-dir": str(run_dir),
                "trunk-address": trunk.address,
                "operator-token-file": str(op_token),
                "tls-ca": str(certs.ca_cert),
            }
            # A mistake in the run config fails the run with one line in flwr run's output, no traceback.
            bad = dep.run(app, {**config, "operator-token-file": str(operator / "missing.token")}, timeout=120)
            assert bad.status == "finished:failed", bad.output
            errors = [x for x in bad.output.splitlines() if "fedsea: error:" in x]
            assert len(errors) == 1 and "missing.token" in errors[0], bad.output
            assert "Traceback" not in bad.output, bad.output
            t_run = time.monotonic()
            result = dep.run(app, config, timeout=400)
            t_run = time.monotonic() - t_run
            assert result.returncode == 0, result.output + dep.logs()
            assert result.status == "finished:completed", result.output + dep.logs()
            refused = [x for x in result.output.splitlines() if "did not answer the query" in x]
            assert refused and all("'client-9' is not a client of the run file" in x for x in refused), result.output
            # The same deployment in client-batch mode: the two owners' ClientApp processes train
            # one shared trunk adapter, their batches joined into one trunk pass per step.
            batch_config = {**config, "run-dir": str(operator / "batched"),
                            "set": "federation.mode=client-batch;federation.rounds=1"}  # fmt: skip
            batched = dep.run(app, batch_config, timeout=400)
            assert batched.status == "finished:completed", batched.output + dep.logs()
            # And with secure aggregation (SecAgg+): one round, the ServerApp gets masked vectors only.
            secure_config = {**config, "run-dir": str(operator / "secure"), "secure-aggregation": True,
                             "set": "federation.rounds=1", "evaluate": "none"}  # fmt: skip
            secure = dep.run(app, secure_config, timeout=400)
            assert secure.status == "finished:completed", secure.output + dep.logs()
            assert "round 1/1: 2/2 clients replied (client-0, client-1)" in secure.output, secure.output
            processes = dep.track()
        assert trunk.alive(), trunk.log.tail  # the trunk server outlives the run: it is the operator's
        # fedsea serve says who comes and goes at its default log level, time-stamped.
        said = [x for x in trunk.log.tail if " INFO client client-" in x and " session " in x]
        assert said and all(x[:4].isdigit() for x in said), trunk.log.tail
    finally:
        trunk.stop()

    # The ServerApp says what each round did and where the report is, naming clients as the run file does.
    lines = [x for x in result.output.splitlines() if "round " in x and "clients replied" in x]
    assert [x[x.index("round ") :].split(":")[0] for x in lines] == ["round 1/2", "round 2/2"], result.output
    assert all("2/2 clients replied (client-0, client-1), mean loss " in x and " MiB moved, " in x for x in lines), (
        lines
    )
    finished = [x for x in result.output.splitlines() if "run finished: 2 rounds, 2 clients" in x]
    assert len(finished) == 1 and finished[0].endswith(f"report {run_dir / 'report.md'}"), result.output
    # The run folder holds what a fedsea simulate folder holds (one report writer).
    for name in ("config.toml", "metrics.jsonl", "report.md", "summary.json", "loss.png", "eval.png", "bytes.png"):
        assert (run_dir / name).is_file(), name
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics if m["type"] == "eval"] == [0, 1, 2]
    traffic = [m for m in metrics if m["type"] == "traffic"]
    assert sorted((m["client"], m["round"]) for m in traffic) == [(c, r) for c in ("client-0", "client-1")
                                                                  for r in (1, 2)]  # fmt: skip
    assert all(m["bytes_sent"] > 0 and m["bytes_received"] > 0 for m in traffic)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["bytes_moved"] == sum(
        m["bytes_sent"] + m["bytes_received"] for m in traffic
    )
    report = (run_dir / "report.md").read_text()
    assert "| client-0 |" in report and "| client-1 |" in report
    # The node that named no client of the run file is reported as lost, by node id and Flower's reason.
    assert all("client-9" not in x or x.startswith("**Lost during the run:** node ") for x in report.splitlines())
    assert "client-0: 16 examples" in report  # the data section: each owner's own data
    # fedsea export works on it.
    exported = tmp_path / "merged"
    assert fedsea_main(["export", str(run_dir), str(exported)]) == 0
    assert (exported / "config.json").is_file() and any(exported.glob("*.safetensors"))

    rounds = [json.loads(line) for line in (run_dir / "server_rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(sorted(r["selected"]) == sorted(r["submitted"]) == ["client-0", "client-1"] for r in rounds)
    assert all(r["engine"] == "flower" for r in rounds)
    mean = [sum(r["losses"].values()) / len(r["losses"]) for r in rounds]
    assert mean[1] < mean[0], mean
    # Every block's LoRA B moved: head and tail by the data owners (through Flower), the trunk's on
    # the trunk server (staged by the ServerApp, trained in the clients' sessions, collected).
    first = load_round(run_dir / "checkpoints" / "round-0001")[1]
    folder = latest_round(run_dir)
    assert folder is not None
    number, last, _, _ = load_round(folder)
    assert number == 2
    blocks = {int(k.split(".")[1]) for k in last}
    assert {int(k.split(".")[1]) for k in last if "lora_B" in k and not torch.equal(last[k], first[k])} == blocks
    assert any("lora_B" in k and bool(first[k].abs().sum() > 0) for k in first)  # round 1 trained too
    # Client-batch: both owners in every round, the one group's adapter (every trunk block) trained.
    rounds = [json.loads(line) for line in (operator / "batched" / "server_rounds.jsonl").read_text().splitlines()]
    assert [(r["mode"], sorted(r["submitted"]), r["refused"]) for r in rounds] == [
        ("client-batch", ["client-0", "client-1"], {})
    ]
    one = load_round(operator / "batched" / "checkpoints" / "round-0001")[1]
    # LoRA B starts at zero: every trunk block's moved in the round.
    assert all(bool(one[k].abs().sum() > 0) for k in one if "lora_B" in k and 1 <= int(k.split(".")[1]) <= 4)
    _check_secure_run(operator / "secure")
    # Each owner's state stays on its machine: the noise secret (owner-only) and its steps.
    for i, name in enumerate(("client-0", "client-1")):
        state = tmp_path / f"owner-{i}" / "state"
        assert stat.S_IMODE(os.stat(state / "noise.secret").st_mode) == 0o600
        steps = [json.loads(x) for x in (state / "steps.jsonl").read_text().splitlines()]
        done = sorted((s["round"], s["step"]) for s in steps if "step" in s)
        # Three runs' steps: one of 2 rounds, the client-batch and the secure one of 1 round, 3 steps each.
        assert done == sorted([(r, s) for r in (1, 2) for s in range(3)] + [(1, s) for s in range(3)] * 2), done
        assert all(s["client"] == name for s in steps)
        assert not (run_dir / "clients" / name).exists()  # nothing of the owner's lands in the run folder
    assert trunk.proc.poll() is not None  # stopped by PID (SIGTERM)
    for proc in processes:  # SuperLink, SuperNodes, SuperExecs, ServerApp and ClientApp processes
        assert not proc.is_running(), f"orphan {proc.pid}: {proc.cmdline() if proc.is_running() else ''}"
    print(f"up {t_up:.1f} s, run {t_run:.1f} s, total {time.monotonic() - t0:.1f} s")


def _check_secure_run(folder: Path) -> None:
    """The SecAgg+ run: both clients, four masked replies each, an aggregate that moved head and tail.

    That the secure aggregate equals plain FedAvg within the protocol's bound is tested on the
    Simulation Engine (``test_flower_secagg.py``), where it costs a fraction of this.
    """
    record = json.loads((folder / "server_rounds.jsonl").read_text().splitlines()[0])
    sa = record["secure-aggregation"]
    assert sorted(record["submitted"]) == ["client-0", "client-1"]
    assert sa["replies"] == 4 * 2 and sa["failures"] == 0  # four SecAgg+ stages each, masked vectors only
    assert sa["error-bound"] < 1e-5, sa
    secure = load_round(folder / "checkpoints" / "round-0001")[1]
    last = max(int(k.split(".")[1]) for k in secure)
    head_tail = [k for k in secure if int(k.split(".")[1]) in (0, last)]  # (p, q) = (1, 1)
    moved = max(secure[k].float().abs().max().item() for k in head_tail if "lora_B" in k)  # B starts at zero
    assert moved > 100 * sa["error-bound"], moved
    assert (folder / "report.md").is_file()


def _check_node_auth(dep: Deployment, tmp_path: Path) -> None:
    """SuperNode authentication and TLS as the README sets them up keep strangers out.

    A SuperNode with a valid TLS root but a key nobody registered: the SuperLink answers its
    activation with ApiError 2004 (HTTP 412) and it exits. A SuperNode with a registered key that
    trusts another CA: TLS verification fails and it never joins. Every API is served over TLS.
    """
    rogue = make_node_keys(tmp_path / "keys", "rogue")
    dep.start_supernode("rogue", {"name": "client-0"}, rogue)
    stranger = make_node_keys(tmp_path / "keys", "stranger")
    stranger_id = dep.register(stranger)
    other_ca = make_test_certs(tmp_path / "other_ca").ca_cert
    dep.start_supernode("stranger", {"name": "client-1"}, stranger, root_ca=other_ca, extra=["--max-retries", "1"])
    assert dep.wait_exit("rogue", timeout=60) not in (None, 0), dep.logs()
    assert "Failed to activate SuperNode" in dep.log("rogue"), dep.log("rogue")
    assert "No SuperNode found with the given public key" in dep.log("superlink"), dep.log("superlink")
    assert dep.wait_exit("stranger", timeout=60) not in (None, 0), dep.logs()
    assert "CERTIFICATE_VERIFY_FAILED" in dep.log("stranger"), dep.log("stranger")
    statuses = {int(str(n["node-id"])): n["status"] for n in dep.nodes()}
    assert statuses[stranger_id] == "registered"  # registered, never online
    assert f"Uvicorn running on https://{dep.address}" in dep.log("superlink")
    connection = (tmp_path / "flower" / "flwr_home" / "cli" / "config.toml").read_text()
    assert "insecure" not in connection and "root-certificates" in connection
