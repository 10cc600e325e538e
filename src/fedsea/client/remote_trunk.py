"""The trunk of a training step over gRPC: one Forward and one Backward call per step."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from fedsea.errors import ProtocolError
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.adapters import UNLIMITED
from fedsea.wire.tensors import decode, encode

from .connection import Connection


class RemoteTrunk:
    """A ``TrunkLink`` over gRPC: one Forward and one Backward call per training step."""

    def __init__(
        self,
        connection: Connection,
        session_id: str,
        dtype: int,
        chunk_bytes: int,
        model_dtype: Any,
        device: Any = "cpu",
    ):
        self.connection = connection
        self.session_id = session_id
        self.dtype = dtype
        self.chunk_bytes = chunk_bytes
        self.model_dtype = model_dtype
        self.device = device
        self.step = 0
        self._forward_shape: tuple[int, ...] | None = None

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Send h~_p (B, n, d) and lengths (B,); return h_{L-q} (B, n, d). A resend carries the very same payload."""
        lens = [int(x) for x in lengths.tolist()]
        step = self.step

        def requests() -> Iterator[pb.ForwardRequest]:
            # A retry rebuilds the same messages from the same payload: no fresh noise.
            for i, chunk in enumerate(encode(hidden, self.dtype, self.chunk_bytes)):
                if i == 0:
                    yield pb.ForwardRequest(session_id=self.session_id, step=step, lengths=lens, hidden=chunk)
                else:
                    yield pb.ForwardRequest(hidden=chunk)

        responses = self.connection.stream("forward", self.connection.stub.Forward, requests)
        out = decode((r.hidden for r in responses), "hidden", UNLIMITED)
        if tuple(out.shape) != tuple(hidden.shape):
            raise ProtocolError(f"server answered shape {tuple(out.shape)} for input {tuple(hidden.shape)}")
        return out.to(device=self.device, dtype=self.model_dtype)

    def backward(self, grad: torch.Tensor, update: bool = True) -> torch.Tensor:
        """Send dL/dh_{L-q} (B, n, d); return dL/dh~_p (B, n, d). ``update`` steps the trunk adapter once."""
        step = self.step

        def requests() -> Iterator[pb.BackwardRequest]:
            for i, chunk in enumerate(encode(grad, self.dtype, self.chunk_bytes)):
                if i == 0:
                    yield pb.BackwardRequest(session_id=self.session_id, step=step, update=update, grad=chunk)
                else:
                    yield pb.BackwardRequest(grad=chunk)

        responses = self.connection.stream("backward", self.connection.stub.Backward, requests)
        self.step += 1
        return decode((r.grad for r in responses), "grad", UNLIMITED).to(device=self.device, dtype=self.model_dtype)
