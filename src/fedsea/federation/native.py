"""The native engine of ``fedsea simulate``: a ``fedsea serve --run`` process and one ``fedsea join``
process per client, over real loopback gRPC with TLS and per-client tokens.

Flower's Simulation Engine runs the modes it supports (``fedsea.flower.simulation``); this engine
is kept for what Flower cannot do yet (``federation.mode = "client-batch"``: the sampled clients'
steps joined into one trunk batch, ``fedsea.server.batching``) and on request
(``fedsea simulate --engine native``). ``pids.json`` in the run folder lists the server's and each
client's process id while the run goes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from fedsea.federation.runstate import RunStoppedError, completed_round, exit_reason
from fedsea.federation.simconfig import RunPlan
from fedsea.io import atomic_write_text
from fedsea.wire.ports import free_loopback_port

FEDSEA = [sys.executable, "-m", "fedsea.cli"]


def _tls_args(run_dir: Path, server: bool) -> list[str]:
    s = run_dir / "secrets"
    if not (s / "ca.pem").exists():
        return []
    if server:
        return [
            "--tls-cert",
            str(s / "server.pem"),
            "--tls-key",
            str(s / "server.key"),
            "--tls-client-ca",
            str(s / "ca.pem"),
        ]
    return ["--tls-ca", str(s / "ca.pem"), "--tls-cert", str(s / "client.pem"), "--tls-key", str(s / "client.key")]


def run_processes(plan: RunPlan, run_dir: Path, resume: bool, progress: bool = True) -> dict[str, str]:
    """Start the server and the clients, follow the rounds, stop the server when the clients are done.

    Returns:
        The clients lost on the way (name: how they ended) in a run that still finished every round.

    Raises:
        RunStoppedError: the server did not start or died, or clients were lost and the run
            stopped before its last round.
    """
    port = free_loopback_port()
    tokens = json.loads((run_dir / "secrets" / "client_tokens.json").read_text())
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    server_cmd = [
        *FEDSEA,
        "serve",
        "--model",
        plan.model,
        "--port",
        str(port),
        "--run",
        str(run_dir / "config.toml"),
        "--run-dir",
        str(run_dir),
        "--tokens",
        str(run_dir / "secrets" / "tokens.json"),
        *_tls_args(run_dir, True),
        *(["--resume"] if resume else []),
    ]
    server_log = (logs / "server.log").open("a")
    native = {"FEDSEA_NATIVE_ENGINE": "1"}  # asked for: serve --run and join print no pointer to Flower
    server = subprocess.Popen(
        server_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **native}
    )
    assert server.stdout is not None
    said = ""
    for line in server.stdout:
        server_log.write(line)
        said = line.strip() or said
        if "listening on" in line:
            break
    else:
        server_log.close()
        server.wait()
        raise RunStoppedError(f"the server did not start ({said or exit_reason(server.returncode)}); see {logs}")
    # Copy the server's output from here on as it comes: a full pipe would block the server.
    drain = threading.Thread(target=server_log.writelines, args=(server.stdout,), daemon=True)
    drain.start()
    clients = []
    for c in plan.clients:
        cmd = [
            *FEDSEA,
            "join",
            "--server",
            f"localhost:{port}",
            "--model",
            plan.model,
            "--run",
            str(run_dir / "config.toml"),
            "--client",
            c.name,
            "--shard",
            str(run_dir / "clients" / c.name / "shard.json"),
            "--log",
            str(run_dir / "clients" / c.name / "steps.jsonl"),
            "--noise-secret-file",
            str(run_dir / "clients" / c.name / "noise.secret"),
            "--net-latency-ms",  # the run file's WAN emulation (join takes it from flags only)
            str(plan.config.wire.latency_ms),
            *(["--net-mbps", str(plan.config.wire.mbps)] if plan.config.wire.mbps else []),
            "--quiet",
            *_tls_args(run_dir, False),
        ]
        # Clients compute only their head and tail: one thread each leaves the cores to the trunk.
        # The token goes in the environment, readable by this user only (/proc/PID/environ), never
        # in argv, which every user of the machine sees in the process list.
        env = {**os.environ, "OMP_NUM_THREADS": "1", **native, "FEDSEA_TOKEN": tokens[c.name]}
        log = (logs / f"{c.name}.log").open("a")
        clients.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    pids = {"server": server.pid, **{c.name: p.pid for c, p in zip(plan.clients, clients, strict=True)}}
    atomic_write_text(run_dir / "pids.json", json.dumps(pids))
    rounds_file = run_dir / "server_rounds.jsonl"
    bar = tqdm(total=plan.fed.rounds, desc="rounds", unit="round", disable=not progress)
    seen = 0
    server_code: int | None = None
    try:
        while any(p.poll() is None for p in clients):
            server_code = server.poll()
            if server_code is not None:  # the server exits only when told: it died
                break
            records = rounds_file.read_text().splitlines() if rounds_file.exists() else []
            for line in records[seen:]:
                r = json.loads(line)
                losses = [v for v in r["losses"].values() if v is not None]
                bar.set_postfix(loss=f"{sum(losses) / max(1, len(losses)):.4f}", clients=len(r["submitted"]))
                bar.update(r["round"] - bar.n)
            seen = len(records)
            time.sleep(0.5)
        server_code = server.poll() if server_code is None else server_code
    finally:
        bar.close()
        for p in clients:
            if p.poll() is None:
                p.kill()
                p.wait()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        drain.join(timeout=10)
        server_log.close()
        (run_dir / "pids.json").unlink(missing_ok=True)
    completed = completed_round(run_dir)
    total = plan.fed.rounds
    if server_code is not None and completed < total:
        raise RunStoppedError(f"the server was lost ({exit_reason(server_code)}) after round {completed} of {total}")
    lost = {c.name: exit_reason(p.returncode) for c, p in zip(plan.clients, clients, strict=True) if p.returncode}
    if lost and completed < total:
        who = ", ".join(f"{name} ({how})" for name, how in lost.items())
        raise RunStoppedError(f"client(s) {who} failed and the run stopped after round {completed} of {total}")
    return lost
