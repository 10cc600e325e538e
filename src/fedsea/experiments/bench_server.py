"""The benchmarks' trunk server: a process serving one model on loopback, on a given device and dtype.

``python -m fedsea.experiments.bench_server --model M --port P [--device D] [--dtype T]`` loads
``M`` as ``fedsea serve`` does, but on device ``D`` in dtype ``T`` (the benchmarks' client loads
the same source, so both sides build the same weights: a ``random:`` model is identical on
every device), and prints ``... listening on ...`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import threading
from typing import Any

import torch

from fedsea.config import DTYPE_SPECS as BENCH_DTYPES
from fedsea.model.device import resolve_device, resolve_dtype


def bench_device(spec: str) -> torch.device:
    """``--device`` as a torch device (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...), checked to exist."""
    device = resolve_device(spec)
    assert isinstance(device, torch.device)  # without spread=True, never "auto"
    return device


def bench_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--dtype`` by name (``auto``: bfloat16 on CUDA, float32 elsewhere; float32, bf16, ...)."""
    return resolve_dtype(name, device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock timer sees it finished (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_bench_server(model: str, port: int, device: str = "auto", dtype: str = "auto") -> Any:
    """This module's server in a subprocess on loopback; returns the Popen once it listens."""
    cmd = [sys.executable, "-m", "fedsea.experiments.bench_server", "--model", model, "--port", str(port)]
    cmd += ["--device", device, "--dtype", dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return wait_until_listening(proc, "the benchmark's trunk server")


def stop_server(proc: Any, timeout: float = 60.0) -> None:
    """SIGTERM ``proc`` (a graceful stop: sessions closed, the port freed); killed if not gone in ``timeout``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until_listening(proc: Any, what: str) -> Any:
    """Read ``proc``'s output until it says ``listening on``; then drain it in a daemon thread.

    A pipe nobody reads fills up (64 KiB) and blocks the server on its next log line; a server
    that never listens (or a Ctrl-C meanwhile) is killed rather than left running.
    """
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "listening on" in line:
                threading.Thread(target=proc.stdout.read, daemon=True, name="bench-server-output").start()
                return proc
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{what} did not start:\n" + "".join(seen))


def main(argv: list[str] | None = None) -> int:
    """Load the model on the device and serve it on 127.0.0.1 until SIGTERM."""
    from fedsea.wire.memory import keep_freed_memory

    keep_freed_memory()  # as ``fedsea serve`` does (through the fedsea command)
    from fedsea.model.load import load_model
    from fedsea.server.app import TrunkServer, serve_until_signalled
    from fedsea.server.trunk import TrunkHost

    parser = argparse.ArgumentParser(prog="python -m fedsea.experiments.bench_server")
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=list(BENCH_DTYPES))
    args = parser.parse_args(argv)
    print(f"loading {args.model} on {args.device} in {args.dtype} ...", flush=True)
    device = bench_device(args.device)
    model = load_model(args.model, dtype=bench_dtype(args.dtype, device), device=device)
    host = TrunkHost(model)
    print(f"base model fingerprint {host.fingerprint}", flush=True)
    asyncio.run(serve_until_signalled(TrunkServer(host, host="127.0.0.1", port=args.port)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
