"""Run any Flower app on Flower's Deployment Engine on loopback, offline, for tests.

``deployment(app_dir, tmp, nodes)`` starts a real ``flower-superlink`` and one ``flower-supernode``
per entry of ``nodes`` (each its own process, on 127.0.0.1 and free ports), with TLS (a throwaway
CA from ``fedsea.wire.certs.make_test_certs``) and SuperNode authentication (one ECDSA P-384 key
pair per SuperNode, its public key registered with ``flwr supernode register``), waits until
every SuperNode is online, and yields a ``Deployment`` whose ``run(app_dir, run_config)`` runs
``flwr run --stream`` against that SuperLink and returns the run's exit code, status and logs.
On exit it stops every process it started and the processes those started (SuperExec,
ServerApp, ClientApp), by PID: SIGTERM, then SIGKILL after a grace period.

How flwr 1.42 is driven (read from its source; the Fleet, Control and Runtime APIs are HTTP on
one port):

- SuperLink: ``flower-superlink --host 127.0.0.1 --port P --ssl-ca-certfile ca.pem
  --ssl-certfile server.pem --ssl-keyfile server.key --enable-supernode-auth
  --disable-runtime-dependency-installation`` (the last: no ``uv sync`` of the app's
  dependencies, which would reach the network).
- SuperNode: ``flower-supernode --superlink 127.0.0.1:P --root-certificates ca.pem
  --auth-supernode-private-key node.key --node-config 'partition-id=0 ...' --port Q``
  (``--port``: its own Runtime API, 9094 by default, so two SuperNodes on one host need two).
- Keys: an EC private key in OpenSSH format for the SuperNode, its OpenSSH public key given to
  ``flwr supernode register node.pub <connection>``; an unregistered key is refused.
- ``flwr`` CLI: a SuperLink *connection* in ``$FLWR_HOME/config.toml``
  (``[superlink.NAME] address, root-certificates``), then ``flwr run APP_DIR NAME``.
- Every process gets its own ``FLWR_HOME`` under ``tmp`` (installed FABs, the CLI config, the
  update-check cache: nothing under ``~/.flwr``), ``FLWR_TELEMETRY_ENABLED=0`` and
  ``FLWR_DISABLE_UPDATE_CHECK=1`` (both would reach the network), and the venv's ``bin`` first
  on ``PATH`` (SuperLink and SuperNode start ``flower-superexec`` by name).

Usage (any app directory with a ``[tool.flwr.app]`` pyproject; its modules, fedsea included,
must be importable in this environment: the processes inherit ``os.environ``, ``PYTHONPATH`` too)::

    with deployment(app_dir, tmp_path, [{"partition-id": 0}, {"partition-id": 1}]) as dep:
        result = dep.run(app_dir, {"num-server-rounds": 2, "out-path": str(tmp_path / "out.json")})
        assert result.status == "finished:completed", result.output + dep.logs()

Timeouts (defaults): ``start_timeout_s`` 60 s for the SuperLink to answer and the SuperNodes to
come online, ``run_timeout_s`` 120 s for a run, ``stop_grace_s`` 5 s between SIGTERM and SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsea.wire.certs import CertPaths, make_test_certs
from fedsea.wire.ports import free_loopback_port

BIN = Path(sys.executable).parent
CONNECTION = "fedsea-test"
ConfigValue = str | int | float | bool


class DeploymentError(RuntimeError):
    """A process of the deployment did not come up, or a ``flwr`` command failed."""


@dataclass(frozen=True)
class RunResult:
    """What ``Deployment.run`` saw: ``flwr run``'s exit code and output, the run's id and status."""

    returncode: int
    output: str
    run_id: int | None
    status: str


@dataclass(frozen=True)
class NodeKeys:
    """A SuperNode's authentication key pair (OpenSSH formats, as flwr 1.42 reads them)."""

    private: Path
    public: Path


def make_node_keys(directory: Path, name: str) -> NodeKeys:
    """Write an ECDSA P-384 key pair: ``NAME.key`` (OpenSSH private) and ``NAME.pub``.

    Equivalent to ``ssh-keygen -t ecdsa -b 384 -N '' -f NAME.key`` (Flower's documented way).
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(directory / f"{name}.key", directory / f"{name}.pub")
    keys.private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    keys.private.chmod(0o600)
    keys.public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return keys


def _config_arg(values: Mapping[str, ConfigValue]) -> str:
    """``{"partition-id": 0, "name": "a"}`` -> ``partition-id=0 name="a"`` (TOML values)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)  # a TOML basic string: quotes and backslashes escaped
        else:
            text = repr(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


@dataclass
class Deployment:
    """A running SuperLink and its SuperNodes; see the module docstring."""

    tmp: Path
    port: int
    certs: CertPaths | None
    node_auth: bool
    start_timeout_s: float = 60.0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    node_ids: dict[str, int] = field(default_factory=dict)
    # Every descendant seen so far (SuperExec, flwr-serverapp, flwr-clientapp), by PID: one whose
    # parent died (a refused SuperNode) is re-parented to init, so only this memory finds it.
    # psutil.Process remembers the create time: a reused PID is never signalled.
    seen: dict[tuple[int, float], psutil.Process] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """The SuperLink's address (all APIs) as ``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def env(self, name: str) -> dict[str, str]:
        """The environment of process ``name``: its own FLWR_HOME, no telemetry, venv first on PATH."""
        home = self.tmp / "flwr_home" / name
        home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            FLWR_HOME=str(home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
            PYTHONUNBUFFERED="1",
        )
        # SuperExec polls for ServerApp/ClientApp tasks every 1 s by default; 0.2 s shortens each
        # round (the SuperNode's own 3 s pull interval is fixed in 1.42).
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
        return env

    def log(self, name: str) -> str:
        """What process ``name`` has written so far (stdout and stderr)."""
        path = self.tmp / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        """The logs of every process, each under a header (for failure messages)."""
        return "\n".join(f"===== {name} =====\n{self.log(name)[-6000:]}" for name in self.procs)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        logs = self.tmp / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"{name}.log").open("wb") as out:
            out.write(f"$ {shlex.join(argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env(name), cwd=self.tmp)
        self.procs[name] = proc
        return proc

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI (as the user would) with this deployment's connection configured."""
        argv = [str(BIN / "flwr"), *args]
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, env=self.env("cli"), cwd=self.tmp, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise DeploymentError(f"{shlex.join(argv)} ran past {timeout} s\n{self.logs()}") from exc

    def _flwr_json(self, *args: str) -> dict[str, object]:
        done = self.flwr(*args, "--format", "json")
        try:
            parsed = json.loads(done.stdout[done.stdout.index("{") :])  # --format json: one object
        except (json.JSONDecodeError, ValueError) as exc:
            raise DeploymentError(f"flwr {shlex.join(args)} -> {done.returncode}: {done.stdout}{done.stderr}") from exc
        if done.returncode != 0 or not isinstance(parsed, dict):
            raise DeploymentError(f"flwr {shlex.join(args)} -> {done.returncode}: {done.stdout}{done.stderr}")
        return parsed

    def write_connection(self) -> Path:
        """Write the CLI's ``$FLWR_HOME/config.toml`` with connection ``fedsea-test`` as default."""
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
        lines.append(f'address = "{self.address}"')
        if self.certs is None:
            lines.append("insecure = true")
        else:
            lines.append(f"root-certificates = {json.dumps(str(self.certs.ca_cert))}")
        path = self.tmp / "flwr_home" / "cli" / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_superlink(self) -> None:
        """Start ``flower-superlink`` and wait until its Control API answers."""
        argv = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--database", str(self.tmp / "superlink.db"), "--disable-runtime-dependency-installation"]
        if self.certs is None:
            argv.append("--insecure")
        else:
            argv += ["--ssl-ca-certfile", str(self.certs.ca_cert), "--ssl-certfile", str(self.certs.server_cert)]
            argv += ["--ssl-keyfile", str(self.certs.server_key)]
        if self.node_auth:
            argv.append("--enable-supernode-auth")
        proc = self._spawn("superlink", argv)
        self.write_connection()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DeploymentError(f"flower-superlink exited with {proc.returncode}\n{self.logs()}")
            with suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                if self.flwr("supernode", "ls", "--format", "json").returncode == 0:
                    return
            time.sleep(0.3)
        raise DeploymentError(f"flower-superlink not up within {self.start_timeout_s} s\n{self.logs()}")

    def register(self, keys: NodeKeys) -> int:
        """``flwr supernode register KEY.pub``: the SuperLink now accepts that key; returns the node id."""
        reply = self._flwr_json("supernode", "register", str(keys.public), CONNECTION)
        return int(str(reply["node-id"]))

    def start_supernode(
        self,
        name: str,
        node_config: Mapping[str, ConfigValue],
        keys: NodeKeys | None,
        root_ca: Path | None = None,
        extra: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """Start ``flower-supernode`` ``name``.

        Args:
            name: its name here (log ``tmp/logs/NAME.log``, its own ``FLWR_HOME``).
            node_config: its ``--node-config`` (the ClientApp reads it as ``context.node_config``).
            keys: authenticate with this key pair (``--auth-supernode-private-key``); None: none.
            root_ca: the CA it trusts for the SuperLink's certificate (default: the deployment's).
            extra: more ``flower-supernode`` flags (e.g. ``--max-retries 1``).
        """
        argv = [str(BIN / "flower-supernode"), "--superlink", self.address, "--port", str(free_loopback_port())]
        if self.certs is None:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(root_ca or self.certs.ca_cert)]
        if keys is not None:
            argv += ["--auth-supernode-private-key", str(keys.private)]
        if node_config:
            argv += ["--node-config", _config_arg(node_config)]
        return self._spawn(name, [*argv, *extra])

    def wait_exit(self, name: str, timeout: float = 30.0) -> int | None:
        """Wait up to ``timeout`` s for process ``name`` to exit; its exit code, or None if it still runs."""
        deadline = time.monotonic() + timeout
        while (code := self.procs[name].poll()) is None and time.monotonic() < deadline:
            self.track()
            time.sleep(0.2)
        return code

    def nodes(self) -> list[dict[str, object]]:
        """``flwr supernode ls``: the SuperLink's nodes (node-id, status, ...)."""
        nodes = self._flwr_json("supernode", "ls", CONNECTION)["nodes"]
        return list(nodes) if isinstance(nodes, list) else []

    def wait_online(self, count: int) -> None:
        """Wait until ``count`` SuperNodes are online (or raise with every process's log)."""
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if name.startswith("node") and proc.poll() is not None:
                    raise DeploymentError(f"flower-supernode {name} exited with {proc.returncode}\n{self.logs()}")
            self.track()
            if sum(1 for n in self.nodes() if n.get("status") == "online") >= count:
                return
            time.sleep(0.5)
        raise DeploymentError(f"{count} SuperNodes not online within {self.start_timeout_s} s\n{self.logs()}")

    def run(self, app_dir: Path, run_config: Mapping[str, ConfigValue], timeout: float = 120.0) -> RunResult:
        """``flwr run APP_DIR --run-config ... --stream``: wait for the run to end, return its logs.

        ``--stream`` returns when the run has finished (its logs are all retrieved); the status
        is then read with ``flwr ls --run-id`` (e.g. ``finished:completed``, ``finished:failed``).
        """
        args = ["run", str(app_dir), CONNECTION, "--stream"]
        if run_config:
            args += ["--run-config", _config_arg(run_config)]
        log = self.tmp / "logs" / "flwr-run.log"
        argv = [str(BIN / "flwr"), *args]
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env("cli"), cwd=self.tmp)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            self.track()  # the ServerApp and ClientApp processes live only while the run does
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise DeploymentError(f"{shlex.join(argv)} ran past {timeout} s\n{log.read_text()}\n{self.logs()}")
            time.sleep(0.2)
        output = log.read_text(errors="replace")
        match = re.search(r"Successfully started run (\d+)", output)
        run_id = int(match.group(1)) if match else None
        status = "not-started"
        if run_id is not None:
            runs = self._flwr_json("ls", CONNECTION, "--run-id", str(run_id)).get("runs")
            if isinstance(runs, list) and runs and isinstance(runs[0], dict):
                status = str(runs[0].get("status", "unknown"))
        return RunResult(proc.returncode, output, run_id, status)

    def track(self) -> list[psutil.Process]:
        """Remember the started processes and all their descendants alive now; return all remembered."""
        for proc in self.procs.values():
            if proc.poll() is not None:  # reaps it: a zombie would keep its SuperExec waiting
                continue
            with suppress(psutil.NoSuchProcess):
                parent = psutil.Process(proc.pid)
                for p in [parent, *parent.children(recursive=True)]:
                    with suppress(psutil.NoSuchProcess):
                        self.seen.setdefault((p.pid, p.create_time()), p)
        return list(self.seen.values())

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop every process started here and their descendants: SIGTERM, then SIGKILL."""
        victims = [p for p in self.track() if p.is_running()]
        for victim in victims:
            with suppress(psutil.NoSuchProcess):
                victim.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(victims, timeout=grace_s)
        for victim in alive:
            with suppress(psutil.NoSuchProcess):
                victim.kill()
        psutil.wait_procs(alive, timeout=grace_s)
        for proc in self.procs.values():
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)


@contextmanager
def deployment(
    app_dir: Path,
    tmp: Path,
    nodes: Sequence[Mapping[str, ConfigValue]],
    tls: bool = True,
    node_auth: bool = True,
    start_timeout_s: float = 60.0,
) -> Iterator[Deployment]:
    """A SuperLink and ``len(nodes)`` SuperNodes on loopback, ready for ``run``.

    Args:
        app_dir: the Flower app (its ``pyproject.toml``); only checked here, ``run`` takes it.
        tmp: where certificates, keys, logs (``tmp/logs/*.log``), the SuperLink's database and
            each process's ``FLWR_HOME`` go.
        nodes: one ``--node-config`` per SuperNode, e.g. ``{"partition-id": 0, "num-partitions": 2}``.
        tls: serve every API over TLS with a throwaway CA (required by ``node_auth``).
        node_auth: ``--enable-supernode-auth``; each SuperNode gets a key pair (``tmp/keys``),
            registered before it starts.
        start_timeout_s: how long the SuperLink may take to answer and the SuperNodes to come online.

    Yields:
        The running ``Deployment``; every process is stopped when the block ends.
    """
    if node_auth and not tls:
        raise ValueError("flower-superlink refuses --enable-supernode-auth without TLS")
    if not (app_dir / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app_dir}/pyproject.toml")
    certs = make_test_certs(tmp / "certs") if tls else None
    dep = Deployment(tmp=tmp, port=free_loopback_port(), certs=certs, node_auth=node_auth)
    dep.start_timeout_s = start_timeout_s
    try:
        dep.start_superlink()
        for i, node_config in enumerate(nodes):
            keys = None
            if node_auth:
                keys = make_node_keys(tmp / "keys", f"node{i}")
                dep.node_ids[f"node{i}"] = dep.register(keys)
            dep.start_supernode(f"node{i}", node_config, keys)
        dep.wait_online(len(nodes))
        yield dep
    finally:
        dep.stop()
