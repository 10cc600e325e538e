"""Issue 14's adversarial memory patterns against a ``fedsea serve`` subprocess under a memory ceiling.

The ceiling: the server's RSS once started plus ``MARGIN`` (1.5 GiB). It is enforced two ways:

- a hard limit, ``RLIMIT_DATA`` set on the running server with ``prlimit`` at its private
  writable memory (``VmData``) after startup plus ``MARGIN``. A cgroup v2 memory limit (what an
  operator would use) needs a writable cgroup tree, which a test machine rarely has;
  ``RLIMIT_AS`` counts reserved address space, and torch, glibc's per-thread malloc arenas
  (64 MiB each, reserved) and gRPC's thread stacks reserve far more than they touch, so a
  limit on it fails at random; ``RLIMIT_DATA`` counts only writable private mappings, the
  ones that can become resident. Under it an allocation past the limit fails (``can't
  allocate memory``) instead of the kernel killing the process: the limit is a safety net for
  the machine, and the test fails on any such failure in the server's log;
- the assertion: the server's peak RSS (``VmHWM``, reset before each pattern) stays under the
  ceiling.

After each pattern, with the hostile calls still open, the server must be alive and an honest
client must train and generate bit-exactly; once the server's own deadlines have passed, its
memory must be back near where it started (freed by the server, not by the hostile client's
disconnect). The server runs with ``FEDSEA_KEEP_FREED_MEMORY=0`` and glibc's mmap threshold
fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed memory leaves the RSS at once
(``fedsea.wire.memory`` otherwise keeps up to 1 GiB of freed heap for reuse, and glibc's
dynamic threshold would keep blocks up to 32 MiB in a fragmented heap).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedsea.experiments.fuzz_client import RawClient, metadata
from fedsea.experiments.good_client import GoodResult, good_run
from fedsea.experiments.serve_proc import TINY_MODEL, ServeProcess
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.auth import TokenStore

GiB, MiB, MB = 1024**3, 1024**2, 1e6
MARGIN = int(1.5 * GiB)
D = 64  # the tiny model's hidden size
IDLE_S = 3.0
FREED_WITHIN_MB = 100  # RSS back within this much of the start once the server's deadlines passed
# The server's flags: limits sized to the ceiling, as an operator of a small server would (the
# defaults, RELIABILITY.md, fit a large one): partial streams freed 2 s after their last message,
# pending activations (forwards awaiting their backward) at most 512 MiB per client and 1 GiB in
# all, half of the 8 generation slots per client.
SERVE_ARGS = ("--idle-timeout-s", str(IDLE_S), "--max-generation-sessions", "8")
EXTRA_SERVE_ARGS: tuple[str, ...] = (
    "--stream-timeout-s", "2",
    "--max-pending-bytes-per-client", str(512 * MiB),
    "--max-pending-bytes", str(GiB),
    "--max-generation-sessions-per-client", "4",
)  # fmt: skip

# /proc (RSS, peak RSS, clear_refs) and prlimit are Linux's.
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc and prlimit")


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Ceiling:
    """One server under the ceiling, two tokens (``hostile``, ``good``), restarted if it died."""

    def __init__(self, directory: Path) -> None:
        store = TokenStore()
        self.hostile_token, self.good_token = store.add("hostile"), store.add("good")
        self.tokens = directory / "tokens.json"
        store.save(self.tokens)
        self.server: ServeProcess | None = None

    def ensure(self) -> ServeProcess:
        if self.server is not None and self.server.alive():
            return self.server
        server = ServeProcess(
            TINY_MODEL, ["--tokens", str(self.tokens), *SERVE_ARGS, *EXTRA_SERVE_ARGS],
            env={"FEDSEA_KEEP_FREED_MEMORY": "0", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)},
        )  # fmt: skip
        good_run(server.address, token=self.good_token)  # first-use allocations before the baseline
        limit = _status(server.pid, "VmData") + MARGIN
        resource.prlimit(server.pid, resource.RLIMIT_DATA, (limit, limit))
        self.server = server
        return server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture(scope="module")
def ceiling() -> Iterator[Ceiling]:
    with tempfile.TemporaryDirectory(prefix="fedsea-memory-") as tmp:
        holder = Ceiling(Path(tmp))
        try:
            yield holder
        finally:
            holder.stop()


@pytest.fixture(scope="module")
def reference(ceiling: Ceiling) -> GoodResult:
    return good_run(ceiling.ensure().address, token=ceiling.good_token)


class Hostile:
    """The hostile client's open calls: streams that stop sending and wait, and finished calls."""

    def __init__(self, client: RawClient, session_id: str, fingerprint: str) -> None:
        self.client, self.session_id, self.fingerprint = client, session_id, fingerprint
        self.release = threading.Event()
        self.calls: list[Any] = []
        self.threads: list[threading.Thread] = []
        self.stalls: list[bool] = []

    def stream(self, rpc: str, messages: list[Any], stall: bool = True) -> None:
        """Send ``messages`` on a new ``rpc`` stream; then (``stall``) keep it open, sending nothing."""

        def requests() -> Iterator[bytes]:
            for m in messages:
                yield m.SerializeToString()
            if stall:
                self.release.wait(120)

        def run() -> None:
            call = self.client.calls[rpc]
            md = metadata(self.client.token)
            try:
                if rpc == "PutTrunkAdapter":
                    future = call.future(requests(), timeout=120, metadata=md)
                    self.calls.append(future)
                    future.result()
                else:
                    responses = call(requests(), timeout=120, metadata=md)
                    self.calls.append(responses)
                    for _ in responses:
                        pass
            except grpc.RpcError:
                pass  # refused or cancelled: either is fine, the server's state is what is checked

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)
        self.stalls.append(stall)

    def wait_complete(self, timeout: float) -> None:
        """Wait for the calls that do not stall (complete requests, OpenSession) to be answered."""
        end = time.monotonic() + timeout
        for t, stalls in zip(self.threads, self.stalls, strict=True):
            if not stalls:
                t.join(max(0.0, end - time.monotonic()))

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()
        for t in self.threads:
            t.join(10)
        self.client.close()


def _chunk(shape: list[int], sent: int, itemsize: int = 4) -> pb.TensorChunk:
    total = itemsize
    for s in shape:
        total *= s
    return pb.TensorChunk(dtype=pb.FLOAT32, shape=shape, offset=0, data=b"\x00" * sent, total_bytes=total)


def adapter_bomb(h: Hostile) -> None:
    """One PutTrunkAdapter stream declaring 14 tensors of 512 MiB, 1 KiB of each sent (14 KiB)."""
    n, sid = 512 * MiB // 4, h.session_id
    h.stream("PutTrunkAdapter", [
        pb.NamedTensorChunk(session_id=sid if i == 0 else "", name=f"bomb.{i}.weight", tensor=_chunk([n], 1024))
        for i in range(14)
    ])  # fmt: skip


def forward_stalls(h: Hostile) -> None:
    """24 Forward streams, each 1 KiB of a declared (64, 4096, d) tensor (64 MiB), then silence."""
    for step in range(24):
        first = pb.ForwardRequest(session_id=h.session_id, step=step, hidden=_chunk([64, 4096, D], 1024))
        first.lengths.extend([4096] * 64)
        h.stream("Forward", [first])


def generate_prefill_stalls(h: Hostile) -> None:
    """4 Generate streams (half the slots): open, half of a (64, 4000, d) prefill (32 of 64 MB), then silence."""
    shape, total = [64, 4000, D], 64 * 4000 * D * 4
    half = [pb.TensorChunk(dtype=pb.FLOAT32, shape=shape, offset=o, data=b"\x00" * (2 * MiB), total_bytes=total)
            for o in range(0, total // 2, 2 * MiB)]  # fmt: skip
    for _ in range(4):
        steps = [pb.GenerateRequest(step=pb.GenerateStep(step=0, lengths=[4000] * 64, hidden=half[0]))]
        steps += [pb.GenerateRequest(step=pb.GenerateStep(step=0, hidden=c)) for c in half[1:]]
        h.stream("Generate", [pb.GenerateRequest(open=pb.GenerateOpen(session_id=h.session_id, max_length=4096)),
                              *steps])  # fmt: skip


def pending_forwards(h: Hostile) -> None:
    """Four large Forwards (64 x 1024 tokens), complete, never followed by a Backward.

    A quarter of the default maximum (64 x 4096) keeps the test's compute to seconds on two
    cores; four of them already hold about 800 MB of activations on the tiny model.
    """
    import torch

    hidden = torch.randn(64, 1024, D).mul_(0.1).numpy().tobytes()
    for step in range(4):
        chunks = [hidden[i : i + 2 * MiB] for i in range(0, len(hidden), 2 * MiB)]
        total = len(hidden)
        messages = [pb.ForwardRequest(session_id=h.session_id, step=step, lengths=[1024] * 64,
                                      hidden=pb.TensorChunk(dtype=pb.FLOAT32, shape=[64, 1024, D], offset=0,
                                                            data=chunks[0], total_bytes=total))]  # fmt: skip
        for i, c in enumerate(chunks[1:], 1):
            messages.append(pb.ForwardRequest(hidden=pb.TensorChunk(
                dtype=pb.FLOAT32, shape=[64, 1024, D], offset=i * 2 * MiB, data=c, total_bytes=total)))  # fmt: skip
        h.stream("Forward", messages, stall=False)


def huge_rank(h: Hostile) -> None:
    """OpenSession with LoRA rank 200,000 on every linear module (1.6 GB of adapter on the tiny model)."""
    request = pb.OpenSessionRequest(
        base_fingerprint=h.fingerprint, head_layers=1, tail_layers=1, wire_dtype=pb.FLOAT32,
        trunk_lora=pb.LoraConfig(r=200_000, alpha=16.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        optimizer=pb.OptimizerConfig(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8),
    )  # fmt: skip

    def run() -> None:
        with contextlib.suppress(grpc.RpcError):  # refused: fine; the server's state is what is checked
            h.client.stub.OpenSession(request, timeout=120, metadata=metadata(h.client.token))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    h.threads.append(thread)
    h.stalls.append(False)


def every_generation_slot(h: Hostile) -> None:
    """One client opens every generation slot (8 here) and keeps the streams open."""
    for _ in range(8):
        h.stream("Generate", [pb.GenerateRequest(open=pb.GenerateOpen(session_id=h.session_id, max_length=64))])


def control(h: Hostile) -> None:
    """No abuse: a complete, valid (2, 8, d) Forward. Shows that the checks themselves can pass."""
    first = pb.ForwardRequest(session_id=h.session_id, step=0, lengths=[8, 8], hidden=_chunk([2, 8, D], 2 * 8 * D * 4))
    h.stream("Forward", [first], stall=False)


PATTERNS: dict[str, Callable[[Hostile], None]] = {
    "control": control,
    "adapter_bomb": adapter_bomb,
    "forward_stalls": forward_stalls,
    "generate_prefill_stalls": generate_prefill_stalls,
    "pending_forwards": pending_forwards,
    "huge_rank": huge_rank,
    "every_generation_slot": every_generation_slot,
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_an_adversarial_pattern_is_held_under_the_memory_ceiling(ceiling, reference, pattern):
    from fedsea.experiments.good_client import _parts
    from fedsea.model.fingerprint import model_fingerprint

    server = ceiling.ensure()
    Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS: this pattern's peak
    start = server.rss()
    client = RawClient(server.address, ceiling.hostile_token)
    fingerprint = model_fingerprint(_parts(TINY_MODEL)[0])
    hostile = Hostile(client, client.open_target(fingerprint, D).session_id, fingerprint)
    alloc_failures = server.log.alloc_failures
    failures: list[str] = []
    try:
        PATTERNS[pattern](hostile)
        hostile.wait_complete(60)
        time.sleep(1.5)  # the server has received what was sent (and computed the complete calls)
        if server.alive():
            try:
                if not good_run(server.address, token=ceiling.good_token, timeout_s=30).same_as(reference):
                    failures.append("the good client's results changed")
            except Exception as exc:  # an honest client's request must succeed
                failures.append(f"the good client failed: {exc}")
            time.sleep(IDLE_S + 2.0)  # the server's own deadlines pass; the hostile calls stay open
        alive = server.alive()
        peak, held_mb = _status(server.pid, "VmHWM"), (server.rss() - start) / MB
    finally:
        hostile.close()
    if not alive:
        failures.append("the server died: " + "".join(server.log.tail[-5:]))
    else:
        print(f"{pattern}: start {start / MB:.0f} MB, peak {peak / MB:.0f} MB, after the deadlines +{held_mb:.0f} MB")
        if peak >= start + MARGIN:
            failures.append(f"peak RSS {peak / MB:.0f} MB over the ceiling {(start + MARGIN) / MB:.0f} MB")
        if held_mb >= FREED_WITHIN_MB:
            failures.append(f"{held_mb:.0f} MB still held after the server's deadlines")
    if server.log.alloc_failures != alloc_failures:
        failures.append(f"the server hit the hard memory limit {server.log.alloc_failures - alloc_failures} times")
    if failures:
        ceiling.stop()  # the next pattern gets a fresh server, not this one's leftovers
    assert not failures, failures
