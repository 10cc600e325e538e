"""``fedsea bench wire``: the tensor codec over loopback gRPC, against a raw-bytes gRPC ceiling.

One direction, client -> server: the clock starts with the activation tensor in the client's
hands and stops when the client has the server's tiny ack, which the server sends only once
it holds the decoded tensor (on ``device``). Paths, timed in turn on the same server:

* ``tensor``: fedsea's codec as the client sends a Forward (``encode_into`` ForwardRequests,
  the server's ``receive_tensor``), at ``chunk_bytes`` per message;
* ``wrapped``: the same codec as ``RemoteTrunk.forward`` calls it today, ``encode`` then
  ``ForwardRequest(hidden=chunk)`` (which copies each chunk once more);
* ``legacy``: the codec before issue 13 (``bench_wire_legacy``), at its 3 MiB chunks, wrapping
  each chunk in a ForwardRequest as ``RemoteTrunk`` did;
* ``raw``: the same bytes as ready-made ``bytes`` chunks of ``chunk_bytes`` with identity
  serializers (no protobuf, no tensor): the ceiling, what gRPC itself carries;
* ``tensor_<compression>`` (``compression``): the tensor path with lossy compression, its
  MB/s counted in the uncompressed tensor's bytes (the effective rate);
* ``tensor_<k>k`` and ``raw_<k>k`` for each extra chunk size in ``other_chunk_bytes``: the
  chunk-size comparison, in the same rounds as the rest.

The server runs in its own process (as ``fedsea serve`` does), so that client and server
each have a core and a GIL, as they would across a network.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import torch

from fedsea.experiments.bench_server import wait_until_listening
from fedsea.wire import compress
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.memory import keep_freed_memory
from fedsea.wire.ports import free_loopback_port
from fedsea.wire.receive import receive_tensor
from fedsea.wire.tensors import DEFAULT_CHUNK_BYTES, encode, encode_into, torch_dtype, wire_dtype

from . import bench_wire_legacy as legacy

SERVICE = "fedsea.bench.v1.Wire"
# Both ends' message limit: room for a 32 MiB chunk and its framing.
MAX_MESSAGE_BYTES = 33 * 1024 * 1024
MAX_TENSOR_BYTES = 1 << 32
LEGACY_CHUNK_BYTES = 3 * 1024 * 1024  # DEFAULT_CHUNK_BYTES before issue 13
TARGET_MB_S = 1000.0


class _Echo:
    """The server's handlers: the fedsea codec (now and before) and raw bytes; each answers a tiny ack."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)

    def _land(self, tensor: torch.Tensor) -> None:
        # The tensor must end where the trunk would use it: a GPU copy from pinned memory.
        if self.device.type == "cuda":
            tensor.to(self.device, non_blocking=True)
            torch.cuda.synchronize(self.device)

    async def tensor(self, requests: AsyncIterator[pb.ForwardRequest], context: Any) -> pb.ForwardResponse:
        pin = self.device.type == "cuda"
        first, tensor, _, _ = await receive_tensor(
            requests, "hidden", MAX_TENSOR_BYTES, lambda m, c: int(c.dtype), pin_memory=pin, allow_compression=True
        )
        self._land(tensor)
        return pb.ForwardResponse(step=first.step)

    async def legacy(self, requests: AsyncIterator[pb.ForwardRequest], context: Any) -> pb.ForwardResponse:
        first, tensor, _, _ = await legacy.receive_tensor(
            requests, "hidden", MAX_TENSOR_BYTES, lambda m, c: int(c.dtype)
        )
        self._land(tensor)
        return pb.ForwardResponse(step=first.step)

    async def raw(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        received = 0
        async for piece in requests:
            received += len(piece)
        return received.to_bytes(8, "little")


async def _serve(port: int, device: str) -> None:
    echo = _Echo(device)
    limits = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", 1 << 20)]
    server = grpc.aio.server(options=limits)
    fwd, ack = pb.ForwardRequest.FromString, pb.ForwardResponse.SerializeToString
    handlers = {
        "tensor": grpc.stream_unary_rpc_method_handler(echo.tensor, fwd, ack),
        "legacy": grpc.stream_unary_rpc_method_handler(echo.legacy, fwd, ack),
        "raw": grpc.stream_unary_rpc_method_handler(echo.raw),  # no serializers: bytes in, bytes out
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"bench wire server listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def serve(port: int, device: str) -> None:
    """Run the echo server on 127.0.0.1:``port`` until killed (the bench's server process)."""
    keep_freed_memory()  # as ``fedsea serve`` does (through the fedsea command)
    asyncio.run(_serve(port, device))


def _start_server(device: str) -> tuple[subprocess.Popen[str], int]:
    port = free_loopback_port()
    code = f"from fedsea.experiments.bench_wire import serve; serve({port}, {device!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return wait_until_listening(proc, "the bench wire server"), port


def _first_or_rest(first: bool) -> pb.ForwardRequest:
    # The session fields in the first message only, as RemoteTrunk.forward sends them.
    return pb.ForwardRequest(session_id="bench", step=1, lengths=[1]) if first else pb.ForwardRequest()


def _wrapped_requests(tensor: torch.Tensor, dtype: int, chunk_bytes: int) -> Iterator[pb.ForwardRequest]:
    for i, chunk in enumerate(encode(tensor, dtype, chunk_bytes)):
        if i == 0:
            yield pb.ForwardRequest(session_id="bench", step=1, lengths=[1], hidden=chunk)
        else:
            yield pb.ForwardRequest(hidden=chunk)


def _legacy_requests(tensor: torch.Tensor, dtype: int) -> Iterator[pb.ForwardRequest]:
    # As RemoteTrunk.forward built them (the constructor copies the chunk).
    for i, chunk in enumerate(legacy.encode(tensor, dtype, LEGACY_CHUNK_BYTES)):
        if i == 0:
            yield pb.ForwardRequest(session_id="bench", step=1, lengths=[1], hidden=chunk)
        else:
            yield pb.ForwardRequest(hidden=chunk)


def _interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call, run in turn (one of each per round) so that all see the same machine.

    Each round starts one call further on: no path always follows the same other path (whose
    allocations it would inherit).
    """
    for call in calls.values():
        call()  # warm-up: connection, allocator, first-touch pages
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def _row_calls(
    channel: grpc.Channel,
    tensor: torch.Tensor,
    dtype: int,
    chunk_bytes: int,
    compression: str | None,
    other_chunks: tuple[int, ...] = (),
) -> dict[str, Callable[[], Any]]:
    fwd, ack = pb.ForwardRequest.SerializeToString, pb.ForwardResponse.FromString
    send = channel.stream_unary(f"/{SERVICE}/tensor", request_serializer=fwd, response_deserializer=ack)
    send_legacy = channel.stream_unary(f"/{SERVICE}/legacy", request_serializer=fwd, response_deserializer=ack)
    send_raw: Any = channel.stream_unary(f"/{SERVICE}/raw")  # bytes in, bytes out
    nbytes = tensor.numel() * tensor.element_size()
    raw = bytes(nbytes)
    pieces = [raw[i : i + chunk_bytes] for i in range(0, nbytes, chunk_bytes)]
    calls: dict[str, Callable[[], Any]] = {
        "tensor": lambda: send(encode_into(tensor, dtype, chunk_bytes, _first_or_rest, "hidden")),
        "wrapped": lambda: send(_wrapped_requests(tensor, dtype, chunk_bytes)),
        "legacy": lambda: send_legacy(_legacy_requests(tensor, dtype)),
        "raw": lambda: send_raw(iter(pieces)),
    }
    for other in other_chunks:
        cut = [raw[i : i + other] for i in range(0, nbytes, other)]
        calls[f"tensor_{other // 1024}k"] = lambda n=other: send(  # type: ignore[misc]
            encode_into(tensor, dtype, n, _first_or_rest, "hidden")
        )
        calls[f"raw_{other // 1024}k"] = lambda c=cut: send_raw(iter(c))  # type: ignore[misc]
    if compression is not None:
        kind = compress.compression(compression)
        calls[f"tensor_{compression}"] = lambda: send(
            encode_into(tensor, dtype, chunk_bytes, _first_or_rest, "hidden", kind)
        )
    return calls


def bench_wire(
    sizes_mib: tuple[int, ...] = (16, 64),
    dtypes: tuple[str, ...] = ("bf16", "fp32"),
    repeats: int = 15,
    device: str = "cpu",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    compression: str | None = None,
    other_chunk_bytes: tuple[int, ...] = (),
) -> dict[str, Any]:
    """One-way MB/s (10^6 bytes/s) of each path, per tensor size and wire dtype: median and best.

    Shapes are (4, 512, d), d chosen for the size (16 MiB bf16: d=4096). Target: the fedsea
    codec at >= 1000 MB/s for a 16 MiB bf16 tensor (``throughput_mb_s``), read against the
    raw-bytes ceiling (``ceiling_mb_s``) measured in the same run.
    """
    for size in (chunk_bytes, *other_chunk_bytes):
        if size < 1024 or size > MAX_MESSAGE_BYTES - (1 << 20):
            raise ValueError(
                f"chunk sizes must be in [1 KiB, {(MAX_MESSAGE_BYTES >> 10) - 1024} KiB], got {size} bytes"
            )
    if compression is not None and compression != "none":
        compress.compression(compression)  # refuse an unknown name before starting anything
    compression = None if compression == "none" else compression
    dev = torch.device(device)
    other = tuple(size for size in other_chunk_bytes if size != chunk_bytes)
    proc, port = _start_server(device)
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", 1 << 20)]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
    rows: dict[str, Any] = {}
    try:
        for name in dtypes:
            dtype = wire_dtype(name)
            itemsize = torch.empty(0, dtype=torch_dtype(dtype)).element_size()
            for mib in sizes_mib:
                nbytes = mib * 1024 * 1024
                shape = (4, 512, nbytes // (4 * 512 * itemsize))
                # Made in the wire dtype: the codec's conversion is not what is timed.
                tensor = torch.randn(shape, device=dev).to(torch_dtype(dtype))
                seconds = _interleaved(_row_calls(channel, tensor, dtype, chunk_bytes, compression, other), repeats)
                row: dict[str, Any] = {"shape": list(shape), "bytes": nbytes}
                row.update({f"{path}_mb_s": _mb_s(nbytes, statistics.median(s)) for path, s in seconds.items()})
                row.update({f"{path}_best_mb_s": _mb_s(nbytes, min(s)) for path, s in seconds.items()})
                row["ratio_to_ceiling"] = round(row["tensor_mb_s"] / row["raw_mb_s"], 3)
                row["wrapped_ratio_to_ceiling"] = round(row["wrapped_mb_s"] / row["raw_mb_s"], 3)
                row["legacy_ratio_to_ceiling"] = round(row["legacy_mb_s"] / row["raw_mb_s"], 3)
                row["speedup_over_legacy"] = round(row["tensor_mb_s"] / row["legacy_mb_s"], 2)
                rows[f"{mib}mib_{name}"] = row
    finally:
        channel.close()
        proc.kill()
        proc.wait()
    head = rows[f"{sizes_mib[0]}mib_{dtypes[0]}"]
    return {
        "bench": "wire",
        "direction": "one way: client has the tensor -> server holds it decoded -> tiny ack back to the client",
        "mb": "10^6 bytes",
        "device": device,
        "cpus": _cpus(),
        "chunk_bytes": chunk_bytes,
        "legacy_chunk_bytes": LEGACY_CHUNK_BYTES,
        "repeats": repeats,
        "head_row": f"{sizes_mib[0]}mib_{dtypes[0]}",
        "throughput_mb_s": head["tensor_mb_s"],
        "ceiling_mb_s": head["raw_mb_s"],
        "throughput_best_mb_s": head["tensor_best_mb_s"],
        "ceiling_best_mb_s": head["raw_best_mb_s"],
        "ratio_to_ceiling": head["ratio_to_ceiling"],
        "wrapped_mb_s": head["wrapped_mb_s"],
        "legacy_mb_s": head["legacy_mb_s"],
        "target_mb_s": TARGET_MB_S,
        "rows": rows,
    }


def _mb_s(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
