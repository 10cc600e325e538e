"""Flower's Deployment Engine on loopback: a real flower-superlink and flower-supernode processes,
TLS on every API and SuperNode authentication, driven by `flwr run` (tests/flower_deploy.py).

The app (tests/fixtures/flower_minimal) has partition p reply ``w + (p + 1)`` with weight
``10 (p + 1)``: FedAvg over partitions 0 and 1 adds (1*10*1 + 2*10*2) / 30 = 5/3 per round, so
two rounds from zeros give 10/3 everywhere. A third partition (an unregistered SuperNode) joining
would change both the number of replies and the mean.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedsea.wire.certs import make_test_certs
from tests.flower_deploy import deployment, make_node_keys

APP = Path(__file__).resolve().parents[1] / "fixtures" / "flower_minimal"


def test_deployment_with_tls_and_node_auth_runs_fedavg_and_refuses_an_unregistered_node(tmp_path: Path) -> None:
    t0 = time.monotonic()
    nodes: list[dict[str, str | int | float]] = [
        {"partition-id": 0, "num-partitions": 2},
        {"partition-id": 1, "num-partitions": 2},
    ]
    with deployment(APP, tmp_path, nodes, tls=True, node_auth=True) as dep:
        t_up = time.monotonic() - t0
        assert len(dep.node_ids) == 2

        # A SuperNode with a valid TLS root but a key nobody registered: the SuperLink answers
        # its activation with ApiError 2004 (HTTP 412) and the SuperNode exits (exit code 305 in its log).
        rogue = make_node_keys(tmp_path / "keys", "rogue")
        dep.start_supernode("rogue", {"partition-id": 5, "num-partitions": 2}, rogue)
        # A SuperNode with a registered key that trusts another CA: TLS verification fails, it never joins.
        stranger = make_node_keys(tmp_path / "keys", "stranger")
        stranger_id = dep.register(stranger)
        other_ca = make_test_certs(tmp_path / "other_ca").ca_cert
        dep.start_supernode("stranger", {"partition-id": 6}, stranger, root_ca=other_ca, extra=["--max-retries", "1"])
        assert dep.wait_exit("rogue", timeout=60) not in (None, 0), dep.logs()
        assert "Failed to activate SuperNode" in dep.log("rogue"), dep.log("rogue")
        assert "No SuperNode found with the given public key" in dep.log("superlink"), dep.log("superlink")
        assert dep.wait_exit("stranger", timeout=60) not in (None, 0), dep.logs()
        assert "CERTIFICATE_VERIFY_FAILED" in dep.log("stranger"), dep.log("stranger")
        statuses = {int(str(n["node-id"])): n["status"] for n in dep.nodes()}
        assert statuses[stranger_id] == "registered"  # registered, never online
        online = {int(str(n["node-id"])) for n in dep.nodes() if n["status"] == "online"}
        assert online == set(dep.node_ids.values())

        out = tmp_path / "aggregate.json"
        t_run = time.monotonic()
        result = dep.run(APP, {"out-path": str(out), "num-server-rounds": 2})
        t_run = time.monotonic() - t_run
        assert result.returncode == 0, result.output
        assert result.status == "finished:completed", result.output + dep.logs()
        assert "Received 2 results and 0 failures" in result.output
        report = json.loads(out.read_text())
        assert report["aggregate"] == pytest.approx([10 / 3] * 3, abs=1e-12)
        # The weighted mean of the partition ids, (0 * 10 + 1 * 20) / 30, in both rounds: 0 and 1 only.
        assert report["train_metrics"] == {str(r): {"partition-id": pytest.approx(2 / 3)} for r in (1, 2)}
        processes = dep.track()
        assert len(processes) >= 6  # SuperLink, 2 SuperNodes, their SuperExecs; the apps while running
    for proc in processes:
        assert not proc.is_running(), f"orphan {proc.pid}: {proc.cmdline() if proc.is_running() else ''}"
    # Every API over TLS: the SuperLink serves https and the CLI's connection trusts the test CA.
    assert f"Uvicorn running on https://{dep.address}" in dep.log("superlink")
    connection = (tmp_path / "flwr_home" / "cli" / "config.toml").read_text()
    assert "insecure" not in connection and "root-certificates" in connection
    print(f"up {t_up:.1f} s, run {t_run:.1f} s, total {time.monotonic() - t0:.1f} s")
