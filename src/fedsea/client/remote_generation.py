"""``RemoteStepper``: the trunk's half of a generation over one bidirectional gRPC stream."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import grpc
import torch

from fedsea.errors import InvalidInputError, ProtocolError, RemoteError
from fedsea.training.stepper import REWIND_FIELD
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.adapters import UNLIMITED
from fedsea.wire.tensors import NONE, TensorAssembler, encode_into

from .connection import Connection

_END = object()


class RemoteStepper:
    """Open an inference stream on the server for one of this client's training sessions.

    Every ``step`` sends the hidden states (chunked if large) and waits for the trunk's answer;
    ``rewind`` sends one small message and waits for nothing (the server applies it before the
    next step; a refused length comes back as that step's ``RemoteError``); ``close`` ends the
    stream, which frees the server's cache (so does dropping it).
    """

    def __init__(
        self,
        connection: Connection,
        session_id: str,
        wire_dtype: int,
        chunk_bytes: int,
        max_length: int,
        model_dtype: torch.dtype,
        use_cache: bool = True,
        device: torch.device | str = "cpu",
        compression: int = NONE,
    ) -> None:
        self.connection = connection
        self.dtype = wire_dtype
        self.compression = compression  # the training session's (lossy): steps go, and come back, in it
        self.chunk_bytes = chunk_bytes
        self.model_dtype = model_dtype
        self.device = device
        self._requests: queue.Queue[Any] = queue.Queue()
        self._closed = False
        self._unmetered = 0  # bytes sent since the last step (rewinds), metered with the next one
        open_request = pb.GenerateRequest(
            open=pb.GenerateOpen(session_id=session_id, max_length=max_length, naive=not use_cache)
        )
        self._requests.put(open_request)
        self._responses: Iterator[pb.GenerateResponse] = connection.stub.Generate(
            iter(self._requests.get, _END), metadata=connection.metadata
        )

    def step(
        self, step: int, hidden: torch.Tensor, lengths: torch.Tensor | None, keep_rows: list[int] | None
    ) -> torch.Tensor:
        """Send ``hidden`` (B, n, d) for step ``step``; the trunk's output (B, n, d) comes back."""
        if self._closed:
            raise ProtocolError("the inference stream is closed")
        start = time.perf_counter()
        sent, self._unmetered = self._unmetered, 0
        lens = [int(x) for x in lengths.tolist()] if lengths is not None else []

        def message(first: bool) -> pb.GenerateRequest:
            if first:
                return pb.GenerateRequest(step=pb.GenerateStep(step=step, lengths=lens, keep_rows=keep_rows or []))
            return pb.GenerateRequest(step=pb.GenerateStep(step=step))

        # Chunks written straight into the requests: one copy of the bytes, not two.
        for request in encode_into(hidden, self.dtype, self.chunk_bytes, message, "step.hidden", self.compression):
            sent += request.ByteSize()
            self._requests.put(request)
        self.connection.config.shaper.wait(sent)
        assembler = TensorAssembler("hidden", UNLIMITED, allow_compression=self.compression != NONE)
        received = 0
        try:
            while not assembler.complete:
                response = next(self._responses)
                received += response.ByteSize()
                assembler.add(response.hidden)
        except grpc.RpcError as err:
            self._closed = True
            raise RemoteError(err.code().name, err.details() or "") from None
        except StopIteration:
            self._closed = True
            raise ProtocolError("the server ended the inference stream") from None
        self.connection.config.shaper.wait(received, downlink=True)
        self.connection.meter.record("generate", sent=sent, received=received, network_s=time.perf_counter() - start)
        return assembler.tensor().to(device=self.device, dtype=self.model_dtype)

    def rewind(self, length: int) -> None:
        """Ask the server to truncate the trunk's cache to ``length`` slots (no round trip)."""
        if self._closed:
            raise ProtocolError("the inference stream is closed")
        if length < 0:  # a uint32 on the wire; the server checks the rest (0, beyond its cache, ...)
            raise InvalidInputError(REWIND_FIELD, f"must be a slot count >= 0 to be sent, got {length}")
        message = pb.GenerateRequest(rewind=pb.GenerateRewind(length=length))
        self._unmetered += message.ByteSize()
        self._requests.put(message)

    def close(self) -> None:
        """End the stream politely; the server frees the cache."""
        if self._closed:
            return
        self._closed = True
        self._requests.put(pb.GenerateRequest(close=pb.GenerateClose()))
        self._requests.put(_END)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError:
            pass

    def abandon(self) -> None:
        """Drop the stream without closing it (what a crashed client does); for tests."""
        self._closed = True
        cancel = getattr(self._responses, "cancel", None)
        if cancel is not None:
            cancel()
