"""The trunk of a training step over gRPC: one Forward and one Backward call per step.

A pipelined step (``micro_batches = m > 1``, ``fedsea.training.pipeline``) makes one call per
micro-batch each way instead, each on a worker thread so that the caller computes the next
slice meanwhile; the calls share the channel (HTTP/2 streams) and each retries on its own
with its own payload.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from fedsea.errors import ProtocolError
from fedsea.training.pipeline import MicroIndex
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.adapters import UNLIMITED
from fedsea.wire.tensors import NONE, decode, encode_into

from .connection import Connection


class RemoteTrunk:
    """A ``TrunkLink`` over gRPC: one Forward and one Backward call per training step.

    ``compression`` (a ``TensorChunk.Compression``, lossy) is the session's: the tensors go in
    it, and replies compressed in it are accepted.
    """

    def __init__(
        self,
        connection: Connection,
        session_id: str,
        dtype: int,
        chunk_bytes: int,
        model_dtype: Any,
        device: Any = "cpu",
        compression: int = NONE,
    ):
        self.connection = connection
        self.session_id = session_id
        self.dtype = dtype
        self.chunk_bytes = chunk_bytes
        self.model_dtype = model_dtype
        self.device = device
        self.compression = compression  # the session's: requests are sent in it, replies may come in it
        self.step = 0
        self._forward_shape: tuple[int, ...] | None = None
        self._pool: ThreadPoolExecutor | None = None  # micro-batch calls, started on first use
        self._pool_lock = threading.Lock()

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Send h~_p (B, n, d) and lengths (B,); return h_{L-q} (B, n, d). A resend carries the very same payload."""
        return self._forward_micro(hidden, [int(x) for x in lengths.tolist()], None, self.step)

    def backward(self, grad: torch.Tensor, update: bool = True) -> torch.Tensor:
        """Send dL/dh_{L-q} (B, n, d); return dL/dh~_p (B, n, d). ``update`` steps the trunk adapter once."""
        out = self._backward_micro(grad, None, update, self.step)
        self.step += 1
        return out

    @property
    def compressed(self) -> bool:
        """Whether the session's tensors travel lossy-compressed (replies compressed are then accepted)."""
        return self.compression != NONE

    # -- micro-batches ------------------------------------------------------------------------
    def _submit(self, fn: Any, *args: Any) -> Future[torch.Tensor]:
        with self._pool_lock:
            if self._pool is None:
                # Up to 2 m calls are in flight in a step (m forwards, then m backwards); threads start on demand.
                self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="fedsea-micro")
            return self._pool.submit(fn, *args)

    def submit_forward(self, hidden: torch.Tensor, lengths: torch.Tensor, micro: MicroIndex) -> Future[torch.Tensor]:
        """Send slice ``micro`` of h~_p (B_i, n_i, d) on a worker thread; the future gives h_{L-q} (B_i, n_i, d)."""
        return self._submit(self._forward_micro, hidden, [int(x) for x in lengths.tolist()], micro, self.step)

    def submit_backward(self, grad: torch.Tensor, micro: MicroIndex, update: bool) -> Future[torch.Tensor]:
        """Send slice ``micro`` of dL/dh_{L-q} (B_i, n_i, d); the future gives dL/dh~_p (B_i, n_i, d).

        The server steps the trunk adapter (if ``update``) after the step's last slice.
        """
        return self._submit(self._backward_micro, grad, micro, update, self.step)

    def finish_step(self) -> None:
        """Every slice's backward came back: the next step begins."""
        self.step += 1

    def _forward_micro(
        self, hidden: torch.Tensor, lens: list[int], micro: MicroIndex | None, step: int
    ) -> torch.Tensor:
        def message(first: bool) -> pb.ForwardRequest:
            if not first:
                return pb.ForwardRequest()
            request = pb.ForwardRequest(session_id=self.session_id, step=step, lengths=lens)
            if micro is not None:
                request.micro_batch, request.micro_batches = micro.index, micro.count
            return request

        # A retry rebuilds the same messages from the same payload: no fresh noise. Chunks are
        # written straight into the request (``encode_into``): one copy of the bytes, not two.
        codec = self.compression
        requests = lambda: encode_into(hidden, self.dtype, self.chunk_bytes, message, "hidden", codec)  # noqa: E731
        responses = self.connection.stream("forward", self.connection.stub.Forward, requests)
        out = decode((r.hidden for r in responses), "hidden", UNLIMITED, allow_compression=self.compressed)
        if tuple(out.shape) != tuple(hidden.shape):
            raise ProtocolError(f"server answered shape {tuple(out.shape)} for {_what(micro)} {tuple(hidden.shape)}")
        return out.to(device=self.device, dtype=self.model_dtype)

    def _backward_micro(self, grad: torch.Tensor, micro: MicroIndex | None, update: bool, step: int) -> torch.Tensor:
        def message(first: bool) -> pb.BackwardRequest:
            if not first:
                return pb.BackwardRequest()
            request = pb.BackwardRequest(session_id=self.session_id, step=step, update=update)
            if micro is not None:
                request.micro_batch, request.micro_batches = micro.index, micro.count
            return request

        codec = self.compression
        requests = lambda: encode_into(grad, self.dtype, self.chunk_bytes, message, "grad", codec)  # noqa: E731
        responses = self.connection.stream("backward", self.connection.stub.Backward, requests)
        out = decode((r.grad for r in responses), "grad", UNLIMITED, allow_compression=self.compressed)
        if tuple(out.shape) != tuple(grad.shape):
            raise ProtocolError(f"server answered shape {tuple(out.shape)} for {_what(micro)} {tuple(grad.shape)}")
        return out.to(device=self.device, dtype=self.model_dtype)

    def close(self) -> None:
        """Stop the worker threads of micro-batch calls (none are in flight between steps)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def _what(micro: MicroIndex | None) -> str:
    return "input of shape" if micro is None else f"micro-batch {micro.index} of shape"
