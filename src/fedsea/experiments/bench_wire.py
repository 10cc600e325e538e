"""``fedsea bench wire``: tensor codec + gRPC over loopback, against a raw-bytes gRPC ceiling.

One direction, client -> server: the clock starts with the activation tensor in the client's
hands and stops when the client has the server's tiny ack, which the server sends only once
it holds the decoded tensor (on ``device``). The ceiling is the same transfer as raw bytes
chunks (identity serializers, no protobuf, no tensor): what gRPC itself can carry.

The server runs in its own process (as ``fedsea serve`` does), so that client and server
each have a core and a GIL, as they would across a network.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import torch

from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.ports import free_loopback_port
from fedsea.wire.tensors import DEFAULT_CHUNK_BYTES, encode_into, receive_tensor, wire_dtype

from . import bench_wire_legacy as legacy

SERVICE = "fedsea.bench.v1.Wire"
# The bench's own message limit on both ends: room for the largest chunk tried plus framing.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_TENSOR_BYTES = 1 << 32
PATHS = ("tensor", "legacy", "raw")


def _ack(step: int) -> pb.ForwardResponse:
    return pb.ForwardResponse(step=step)


class _Echo:
    """The server's three handlers: fedsea codec (now and before) and raw bytes."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)

    def _land(self, tensor: torch.Tensor) -> None:
        # The tensor must end on the device, as the trunk would need it.
        if self.device.type == "cuda":
            tensor.to(self.device, non_blocking=True)
            torch.cuda.synchronize(self.device)

    async def tensor(self, requests: AsyncIterator[pb.ForwardRequest], context: Any) -> pb.ForwardResponse:
        pin = self.device.type == "cuda"
        first, tensor, _, _ = await receive_tensor(
            requests, "hidden", MAX_TENSOR_BYTES, lambda m, c: int(c.dtype), pin_memory=pin
        )
        self._land(tensor)
        return _ack(first.step)

    async def legacy(self, requests: AsyncIterator[pb.ForwardRequest], context: Any) -> pb.ForwardResponse:
        first, tensor, _, _ = await legacy.receive_tensor(
            requests, "hidden", MAX_TENSOR_BYTES, lambda m, c: int(c.dtype)
        )
        self._land(tensor)
        return _ack(first.step)

    async def raw(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        received = 0
        async for piece in requests:
            received += len(piece)
        return received.to_bytes(8, "little")


async def _serve(port: int, device: str) -> None:
    echo = _Echo(device)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", 1 << 20)]
    )
    fwd, ack = pb.ForwardRequest.FromString, pb.ForwardResponse.SerializeToString
    handlers = {
        "tensor": grpc.stream_unary_rpc_method_handler(echo.tensor, fwd, ack),
        "legacy": grpc.stream_unary_rpc_method_handler(echo.legacy, fwd, ack),
        "raw": grpc.stream_unary_rpc_method_handler(echo.raw),  # bytes in, bytes out
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"bench wire server listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def serve(port: int, device: str) -> None:
    """Run the echo server on 127.0.0.1:``port`` until killed (the bench's server process)."""
    asyncio.run(_serve(port, device))


def _start_server(device: str) -> tuple[subprocess.Popen[str], int]:
    port = free_loopback_port()
    code = f"from fedsea.experiments.bench_wire import serve; serve({port}, {device!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "listening on" in line:
            return proc, port
    raise RuntimeError("the bench wire server did not start:\n" + "".join(seen))


def _requests(tensor: torch.Tensor, dtype: int, chunk_bytes: int, old: bool) -> Iterator[pb.ForwardRequest]:
    # The session fields in the first message only, as RemoteTrunk.forward sends them.
    if old:  # as RemoteTrunk.forward built them before issue 13
        for i, chunk in enumerate(legacy.encode(tensor, dtype, chunk_bytes)):
            yield pb.ForwardRequest(session_id="bench", step=1, lengths=[1], hidden=chunk) if i == 0 else (
                pb.ForwardRequest(hidden=chunk)
            )
        return

    def message(first: bool) -> pb.ForwardRequest:
        return pb.ForwardRequest(session_id="bench", step=1, lengths=[1]) if first else pb.ForwardRequest()

    yield from encode_into(tensor, dtype, chunk_bytes, message, "hidden")


def _interleaved(calls: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds of each call, run in turn (one of each per round) so that all see the same machine."""
    for call in calls.values():
        call()  # warm-up: connection, allocator, first-touch pages
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_wire(
    sizes_mib: tuple[int, ...] = (16, 64),
    dtypes: tuple[str, ...] = ("bf16", "fp32"),
    repeats: int = 5,
    device: str = "cpu",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    paths: tuple[str, ...] = PATHS,
) -> dict[str, Any]:
    """Median one-way MB/s (10^6 bytes/s) of each path, per tensor size and wire dtype.

    Shapes are (4, 512, d) with d chosen for the size (16 MiB bf16: d=4096). Target: the
    fedsea codec at >= 1000 MB/s for a 16 MiB bf16 tensor.
    """
    for path in paths:
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r} (expected {', '.join(PATHS)})")
    dev = torch.device(device)
    proc, port = _start_server(device)
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", 1 << 20)],
    )
    fwd, ack = pb.ForwardRequest.SerializeToString, pb.ForwardResponse.FromString
    calls = {
        "tensor": channel.stream_unary(f"/{SERVICE}/tensor", request_serializer=fwd, response_deserializer=ack),
        "legacy": channel.stream_unary(f"/{SERVICE}/legacy", request_serializer=fwd, response_deserializer=ack),
        "raw": channel.stream_unary(f"/{SERVICE}/raw"),
    }
    rows: dict[str, Any] = {}
    try:
        for dtype_name in dtypes:
            wdt = wire_dtype(dtype_name)
            itemsize = torch.empty(0, dtype=_TORCH_DTYPES[dtype_name]).element_size()
            for mib in sizes_mib:
                nbytes = mib * 1024 * 1024
                shape = (4, 512, nbytes // (4 * 512 * itemsize))
                tensor = torch.randn(shape, device=dev).to(_TORCH_DTYPES[dtype_name])
                raw = bytes(nbytes)
                pieces = [raw[i : i + chunk_bytes] for i in range(0, nbytes, chunk_bytes)]
                row: dict[str, Any] = {"shape": list(shape), "bytes": nbytes}
                timed = {
                    path: (
                        (lambda: calls["raw"](iter(pieces)))
                        if path == "raw"
                        else (lambda c=calls[path], old=path == "legacy": c(_requests(tensor, wdt, chunk_bytes, old)))
                    )
                    for path in paths
                }
                for path, seconds in _interleaved(timed, repeats).items():
                    row[f"{path}_mb_s"] = round(nbytes / seconds / 1e6, 1)
                if "tensor" in paths and "raw" in paths:
                    row["ratio_to_ceiling"] = round(row["tensor_mb_s"] / row["raw_mb_s"], 3)
                if "tensor" in paths and "legacy" in paths:
                    row["speedup_over_legacy"] = round(row["tensor_mb_s"] / row["legacy_mb_s"], 2)
                rows[f"{mib}mib_{dtype_name}"] = row
    finally:
        channel.close()
        proc.kill()
        proc.wait()
    head = rows.get(f"{sizes_mib[0]}mib_{dtypes[0]}", {})
    return {
        "bench": "wire",
        "direction": "one way: client tensor -> server holds the decoded tensor -> tiny ack back",
        "mb": "10^6 bytes",
        "device": device,
        "chunk_bytes": chunk_bytes,
        "repeats": repeats,
        "throughput_mb_s": head.get("tensor_mb_s"),
        "ceiling_mb_s": head.get("raw_mb_s"),
        "ratio_to_ceiling": head.get("ratio_to_ceiling"),
        "target_mb_s": 1000.0,
        "rows": rows,
    }


_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
