"""Helpers of the issue-14 memory tests: a server in this thread's process, raw streams left open."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import torch

import fedsea
from fedsea.config import ServerLimits
from fedsea.model.fingerprint import model_fingerprint
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.service import TrunkServicer
from fedsea.server.trunk import TrunkHost
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire import fedsea_pb2_grpc as pb_grpc
from fedsea.wire.auth import TokenStore
from tests.integration.conftest import TINY

Meta = tuple[tuple[str, str], ...]


def bearer_of(token: str) -> Meta:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


@contextmanager
def serving(
    limits: ServerLimits, tokens: TokenStore | None = None
) -> Iterator[tuple[pb_grpc.TrunkStub, TrunkServicer]]:
    """A stub on a fresh server, and the server's servicer (its budgets)."""
    server = TrunkServer(TrunkHost(fedsea.tiny_llama(**TINY), limits), tokens=tokens)
    thread = ServerThread(server)
    port = thread.start()
    try:
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            yield pb_grpc.TrunkStub(channel), server.servicer
    finally:
        thread.stop()


def open_session(stub: pb_grpc.TrunkStub, r: int = 2, targets: list[str] | None = None, metadata: Meta = ()) -> str:
    request = pb.OpenSessionRequest(
        base_fingerprint=model_fingerprint(fedsea.tiny_llama(**TINY)),
        head_layers=2,
        tail_layers=1,
        trunk_lora=pb.LoraConfig(r=r, alpha=4, dropout=0.0, target_modules=targets or ["q_proj"]),
        optimizer=pb.OptimizerConfig(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8),
        wire_dtype=pb.FLOAT32,
    )
    return str(stub.OpenSession(request, metadata=metadata, timeout=30).session_id)


def vm_size() -> int:
    """This process's virtual memory size in bytes (what a buffer of a declared size reserves)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


def held_until(queue_: queue.Queue[object | None], first: list[object]) -> Iterator[object]:
    """``first``'s messages, then whatever the test puts in ``queue_`` (None ends the stream)."""
    yield from first
    while (item := queue_.get()) is not None:
        yield item


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def partial_chunk(shape: tuple[int, ...], data: bytes) -> pb.TensorChunk:
    """The first chunk of a float32 tensor of ``shape``, with only ``data`` of its bytes."""
    total = 4 * int(torch.Size(shape).numel())
    return pb.TensorChunk(dtype=pb.FLOAT32, shape=list(shape), offset=0, total_bytes=total, data=data)
