"""``fedsea serve`` as a subprocess for the reliability benchmarks and tests (fuzz, soak, memory).

The server runs as its own process, as an operator runs it, so that a crash is visible (the
process is gone), its memory is measurable (``VmRSS`` in ``/proc/PID/status``) and a memory
limit can be put on it alone. Its output is drained in a thread that counts lines, bytes and
Python tracebacks: one traceback per refused request is a finding too (issue 14, item 5).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedsea.experiments.bench_server import wait_until_listening

TINY_MODEL = "tiny-llama"
_ALLOC_FAILURES = ("can't allocate memory", "Cannot allocate memory", "MemoryError", "std::bad_alloc")
FEDSEA = [sys.executable, "-m", "fedsea.cli"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (free when asked: the server binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes (``VmRSS``); 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


@dataclass
class LogCounter:
    """What the server wrote: lines, bytes, tracebacks, and the last lines (for a crash report)."""

    lines: int = 0
    bytes: int = 0
    tracebacks: int = 0
    alloc_failures: int = 0  # allocations refused by the OS (a hard memory limit was hit)
    tail: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        self.lines += 1
        self.bytes += len(line.encode("utf-8", "replace"))
        if line.startswith("Traceback (most recent call last)"):
            self.tracebacks += 1
        if any(text in line for text in _ALLOC_FAILURES):
            self.alloc_failures += 1
        self.tail.append(line)
        del self.tail[:-40]


class ServeProcess:
    """``fedsea serve --model M --host 127.0.0.1 --port P [args]`` in a subprocess, listening.

    Args:
        model: model source (default: the tiny random model, loads in about a second).
        args: further ``fedsea serve`` flags (limits such as ``--idle-timeout-s``).
        preexec_fn: run in the child before ``exec`` (e.g. ``resource.setrlimit``). A limit
            sized from the running server's own figures is set afterwards instead, with
            ``resource.prlimit(server.pid, ...)`` (tests/integration/test_memory_ceiling.py).
        env: extra environment variables.
    """

    def __init__(
        self,
        model: str = TINY_MODEL,
        args: Sequence[str] = (),
        preexec_fn: Callable[[], Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = LogCounter()
        cmd = [*FEDSEA, "serve", "--model", model, "--host", "127.0.0.1", "--port", str(self.port), *args]
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
            preexec_fn=preexec_fn,
        )
        self._start_reader()

    def _start_reader(self) -> None:
        # wait_until_listening hands the rest of the output to a reader that discards it; read
        # it ourselves instead, to count tracebacks.
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        seen: list[str] = []
        for line in stdout:
            seen.append(line)
            self.log.feed(line)
            if "listening on" in line:
                threading.Thread(target=self._drain, daemon=True, name="serve-output").start()
                return
        self.proc.wait()
        raise RuntimeError("fedsea serve did not start:\n" + "".join(seen))

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.feed(line)

    @property
    def pid(self) -> int:
        """The server's process id."""
        return int(self.proc.pid)

    def alive(self) -> bool:
        """Whether the server process still runs (a crash or an out-of-memory kill ends it)."""
        return self.proc.poll() is None

    def rss(self) -> int:
        """The server's resident memory now, in bytes."""
        return rss_bytes(self.pid)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_rss_settled(server: ServeProcess, seconds: float = 1.0) -> int:
    """The server's RSS after ``seconds`` of quiet (in-flight work and frees have finished)."""
    time.sleep(seconds)
    return server.rss()


__all__ = ["TINY_MODEL", "ServeProcess", "free_port", "rss_bytes", "wait_rss_settled", "wait_until_listening"]
