"""The networked commands as a user runs them: separate processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsea.config import RECOMMENDED_RELATIVE_SIGMA

FEDSEA = [sys.executable, "-m", "fedsea.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(proc: subprocess.Popen[str], text: str, timeout: float = 120) -> str:
    seen = ""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"{text!r} not seen; output so far:\n{seen}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    subprocess.run([*FEDSEA, "certs", str(root / "certs")], check=True, env=ENV, capture_output=True)
    token = subprocess.run(
        [*FEDSEA, "token", "add", str(root / "tokens.json"), "clinic-a"],
        check=True,
        env=ENV,
        capture_output=True,
        text=True,
    ).stdout.strip()
    rows = [
        {"prompt": "Review: a delight. Sentiment:", "completion": " positive"},
        {"prompt": "Review: dull and slow. Sentiment:", "completion": " negative"},
        {"text": "The council approved a new park near the river."},
    ] * 3
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, token


def test_serve_train_and_graceful_shutdown(setup):
    root, token = setup
    port = _free_port()
    certs = root / "certs"
    server = subprocess.Popen(
        [*FEDSEA, "serve", "--model", "tiny-llama", "--port", str(port), "--tokens", str(root / "tokens.json"),
         "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
         "--tls-client-ca", str(certs / "ca.pem")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )  # fmt: skip
    try:
        _wait_for(server, "listening on 127.0.0.1")
        common = ["--server", f"localhost:{port}", "--data", str(root / "data.jsonl"), "--model", "tiny-llama",
                  "--head-layers", "1", "--tail-layers", "1", "--tls-ca", str(certs / "ca.pem"),
                  "--tls-cert", str(certs / "client.pem"), "--tls-key", str(certs / "client.key")]  # fmt: skip
        done = subprocess.run(
            [*FEDSEA, "train", *common, "--token", token, "--epochs", "4", "--batch-size", "3", "--lr", "1e-2",
             "--save-adapters", str(root / "adapters"), "--json", "--quiet"],
            env=ENV, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["steps"] == 12 and summary["loss_last"] < summary["loss_first"]
        assert summary["rpcs"]["forward"]["calls"] == 12 and summary["bytes_sent"] > 0
        assert {p.name for p in (root / "adapters").iterdir()} == {"head", "trunk", "tail", "peft"}
        # No noise flag: the recommended relative level, measured on public text, 4 releases (epochs).
        noise = summary["noise"]
        assert noise["mode"] == "relative" and noise["releases"] == 4 and noise["epsilon"] is None
        assert noise["sigma"] == pytest.approx(RECOMMENDED_RELATIVE_SIGMA * noise["rms"]) and noise["sigma"] > 0
        # The same training (same seed: same batches) with int8 on the wire: one byte per element
        # and a float32 scale per token (d = 64) instead of 4 bytes per element.
        lossy = subprocess.run(
            [*FEDSEA, "train", *common, "--token", token, "--epochs", "4", "--batch-size", "3", "--lr", "1e-2",
             "--wire-compression", "int8", "--json", "--quiet"],
            env=ENV, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert lossy.returncode == 0, lossy.stderr[-2000:]
        up = json.loads(lossy.stdout.strip().splitlines()[-1])["rpcs"]["forward"]
        assert up["calls"] == 12
        assert up["bytes_sent"] / summary["rpcs"]["forward"]["bytes_sent"] == pytest.approx((64 + 4) / 256, rel=0.03)

        # Generation and chat through the split, with the trained adapters: noise off and reported.
        conn = [a for a in common if a not in ("--data", str(root / "data.jsonl"))] + ["--token", token]
        said = subprocess.run(
            [*FEDSEA, "generate", *conn, "--adapters", str(root / "adapters"), "--prompt", "The movie was",
             "--max-new-tokens", "4", "--no-chat-template", "--sigma", "0"],
            env=ENV, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert said.returncode == 0, said.stderr[-2000:]
        assert "noise on h_p (p=1): sigma=0," in said.stderr and said.stdout.strip()
        chat = subprocess.run(
            [*FEDSEA, "chat", *conn, "--max-new-tokens", "3", "--relative-sigma", "0.5"],
            input="hello there\n/quit\n", env=ENV, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert chat.returncode == 0, chat.stderr[-2000:]
        assert "(sigma/rms=0.5)" in chat.stderr and "model> " in chat.stdout

        bad = subprocess.run([*FEDSEA, "train", *common, "--token", "0" * 64], env=ENV, capture_output=True, text=True)
        assert bad.returncode == 2 and "UNAUTHENTICATED" in bad.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=60)
    assert server.returncode == 0
    assert "shutting down" in out


def test_serve_refuses_plaintext_on_a_public_address():
    done = subprocess.run([*FEDSEA, "serve", "--model", "tiny-llama", "--host", "0.0.0.0"], env=ENV,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "refusing to serve plaintext" in done.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sigma", "1", "--relative-sigma", "1"], "not allowed with argument"),
        (["--epsilon", "8"], "clip_norm must be set"),
        (["--relative-sigma", "-1"], "relative_sigma must be a finite number"),
    ],
)
def test_train_noise_flags_are_checked(setup, flags, message):
    root, _ = setup
    done = subprocess.run(
        [*FEDSEA, "train", "--server", "localhost:1", "--data", str(root / "data.jsonl"), "--model", "tiny-llama",
         "--head-layers", "1", "--tail-layers", "1", *flags],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


def test_train_reports_a_bad_data_file_by_line(setup, tmp_path):
    root, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"label": 1}\n')
    done = subprocess.run([*FEDSEA, "train", "--server", "localhost:1", "--data", str(bad), "--model", "tiny-llama"],
                          env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and f"{bad}:2" in done.stderr
    assert Path(root / "tokens.json").is_file()
