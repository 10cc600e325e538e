"""The README's "Over the network" commands, run as written (issue 16 item 5): certificates, a
token in the environment, ``fedsea serve`` with mutual TLS and tokens, then ``train``,
``generate`` and ``chat`` against it, on the real default model.

What the test changes, and only that: the port (a free one instead of 50051), ``serve`` goes to
the background (the README runs it in a terminal of its own), the optional ``[--stream]`` is
dropped, ``notes.jsonl`` is made, and ``chat`` reads its input from a pipe.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedsea.wire.ports import free_loopback_port

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"


def network_block() -> list[str]:
    """The README's first bash block under "## Over the network", one command per entry."""
    text = README.read_text()
    section = text[text.index("## Over the network") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no bash block under ## Over the network"
    joined = block.group(1).replace("\\\n", " ")
    # Trailing comments go (the README's commands have no "#" inside quotes).
    lines = [re.sub(r"\s#.*$", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_readme_network_commands_work_as_written(tmp_path):
    commands = network_block()
    assert [c.split()[1] for c in commands if c.startswith("fedsea ")] == [
        "certs", "serve", "train", "generate", "chat"
    ]  # fmt: skip
    port = str(free_loopback_port())
    rows = [{"text": "The patient was discharged in good health."}, {"prompt": "Q: 2+2?", "completion": " 4"}]
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = [
        "set -euo pipefail",
        f'fedsea() {{ "{sys.executable}" -m fedsea.cli "$@"; }}',
        "trap 'kill $SERVE_PID 2>/dev/null || true' EXIT",
    ]
    for command in commands:
        command = command.replace("50051", port).replace("[--stream]", "")
        if command.startswith("fedsea serve"):
            # Python itself in the background (not the shell function), so that $! is the server.
            command = command.replace("fedsea serve", f'"{sys.executable}" -m fedsea.cli serve', 1)
            script += [
                f"{command} > serve.log 2>&1 &",
                "SERVE_PID=$!",
                "for _ in $(seq 600); do grep -q 'listening on' serve.log && break; sleep 0.2; done",
                "grep -q 'listening on' serve.log || { cat serve.log; exit 1; }",
            ]
        elif command.startswith("fedsea chat"):
            script.append(f"printf 'hello\\n/quit\\n' | {command} --max-new-tokens 8")
        else:
            script.append(command)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("FEDSEA_TOKEN", None)
    # A session of its own: on a timeout the whole group (the backgrounded server too) is killed.
    proc = subprocess.Popen(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("the README's commands did not finish in 600 s:\n" + stdout[-2000:] + stderr[-2000:])
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever of the group outlived the script
            os.killpg(proc.pid, signal.SIGKILL)
    server = (tmp_path / "serve.log").read_text()
    assert "listening on" in server
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "adapters" / "peft" / "adapter_config.json").is_file()
    assert "model> " in done.stdout and "fedsea: error" not in done.stderr
