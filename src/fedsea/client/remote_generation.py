"""``RemoteStepper``: the trunk's half of a generation over one bidirectional gRPC stream.

Each step has a deadline (``decode_timeout_s`` of ``ClientTimeouts``; ``step_timeout_s`` for
the prefill): a background thread reads the stream's responses into a queue, and a step waits
on that queue for at most its deadline, so a frozen server is a ``ServerNotAnsweringError``,
not a hang, however long the stream lives.

A lost server (UNAVAILABLE: killed, restarted, connection reset) is survived when the stepper
was given ``reopen``: it reconnects with backoff for up to ``reconnect_timeout_s``, opens a new
training session there (``SplitClient.reopen_session``: same spec, seed and trunk adapter),
opens a new stream and replays, in order, every message it sent on the lost one (the prefill,
each step's keep_rows and hidden states, each rewind) to rebuild the trunk's KV cache, then
takes the answer of the step that was cut off. The replay resends the very bytes sent before,
noise included (a fresh draw would leak a second noisy view of the same hidden states and
change the output): the answer, and so the generated tokens, are those of an uninterrupted run.

The replay log's memory: the wire messages of the prefill (B, n, d) plus one (B_t, 1, d)
vector per row still running per decode step, in the wire dtype (with compression, 1 byte an
element and a scale per row): at most B x max_length x d x itemsize, which the server's
``max_seq_len`` bounds; e.g. 8 rows x 2048 slots x 576 (SmolLM2-135M) in bf16 is 18.9 MB.
Rewinds (speculative decoding) keep the rejected drafts in the log, since the replay must
send them too: at most (draft length + 1) times that. A naive stream (no cache) resends
everything each step: it logs only the current step. The log is freed when the stream ends.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import torch

from fedsea.errors import InvalidInputError, ProtocolError, RemoteError
from fedsea.training.stepper import REWIND_FIELD
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.adapters import UNLIMITED
from fedsea.wire.tensors import NONE, TensorAssembler, encode_into

from .connection import Connection
from .deadlines import CallKind, keepalive_failed

_END = object()
# A new connection and session id on the server, after a loss (``SplitClient.reopen_session``),
# the session's opening given at most the seconds passed.
Reopen = Callable[[float], tuple[Connection, str]]


class _Lost(Exception):
    """The stream broke with UNAVAILABLE: the server may come back (see ``RemoteStepper._resume``)."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self.details = details


def _read(call: Iterator[pb.GenerateResponse], out: queue.Queue[Any]) -> None:
    """Move the stream's responses into ``out``; then ``_END``, or the call's ``grpc.RpcError``."""
    try:
        for response in call:
            out.put(response)
        out.put(_END)
    except grpc.RpcError as err:
        out.put(err)


class RemoteStepper:
    """Open an inference stream on the server for one of this client's training sessions.

    Every ``step`` sends the hidden states (chunked if large) and waits, for at most its
    deadline, for the trunk's answer; ``rewind`` sends one small message and waits for nothing
    (the server applies it before the next step; a refused length comes back as that step's
    ``RemoteError``); ``close`` ends the stream, which frees the server's cache (so does
    dropping it). ``reopen`` (optional) makes the stepper survive a server restart (see the
    module); ``resumes`` counts the times it did.
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
        reopen: Reopen | None = None,
    ) -> None:
        self.connection = connection
        self.dtype = wire_dtype
        self.compression = compression  # the training session's (lossy): steps go, and come back, in it
        self.chunk_bytes = chunk_bytes
        self.model_dtype = model_dtype
        self.device = device
        self.max_length = max_length
        self.use_cache = use_cache
        self.reopen = reopen
        self.resumes = 0
        self._closed = False
        self._unmetered = 0  # bytes sent since the last step (rewinds), metered with the next one
        # Every message sent after the open, in order, and the steps among them: what a replay resends.
        self._log: list[pb.GenerateRequest] = []
        self._steps = 0
        self._open(session_id)

    def _open(self, session_id: str) -> None:
        """Open a stream for ``session_id``, with a reader thread filling ``_responses``."""
        self._requests: queue.Queue[Any] = queue.Queue()
        self._requests.put(
            pb.GenerateRequest(
                open=pb.GenerateOpen(session_id=session_id, max_length=self.max_length, naive=not self.use_cache)
            )
        )
        # No deadline on the stream itself (it lives as long as the generation): each step has its own.
        self._call: Any = self.connection.stub.Generate(
            iter(self._requests.get, _END), metadata=self.connection.metadata
        )
        self._responses: queue.Queue[Any] = queue.Queue()
        reader = threading.Thread(
            target=_read, args=(self._call, self._responses), name="fedsea-generate-reader", daemon=True
        )
        reader.start()

    def _drop(self) -> None:
        """Cancel the current stream and end its request iterator (its reader thread then ends)."""
        self._requests.put(_END)
        self._call.cancel()

    @property
    def replay_bytes(self) -> int:
        """Bytes held in the replay log (what a resume would resend)."""
        return sum(m.ByteSize() for m in self._log)

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
        messages = list(encode_into(hidden, self.dtype, self.chunk_bytes, message, "step.hidden", self.compression))
        if not self.use_cache:  # a naive step carries everything: nothing before it needs replaying
            self._log.clear()
            self._steps = 0
        self._log.extend(messages)
        self._steps += 1
        sent += sum(request.ByteSize() for request in messages)
        # The emulated uplink delays the step before the server can see it, as a real link does:
        # waiting after the put would let the server compute during the uplink's latency.
        self.connection.config.shaper.wait(sent)
        for request in messages:
            self._requests.put(request)
        # The prefill (and a naive step) costs the server a training step's forward; a decode
        # step, one token per row.
        kind: CallKind = "step" if lengths is not None else "decode"
        try:
            try:
                out, received = self._receive(kind)
            except _Lost as lost:
                out, received = self._resume(lost)
        except BaseException:
            self._fail()  # the stream is done for: the server frees its cache when the call ends
            raise
        self.connection.config.shaper.wait(received, downlink=True)
        self.connection.meter.record("generate", sent=sent, received=received, network_s=time.perf_counter() - start)
        return out.to(device=self.device, dtype=self.model_dtype)

    def _receive(self, kind: CallKind) -> tuple[torch.Tensor, int]:
        """The answer to one step, waited for for at most the deadline of ``kind``; and its bytes.

        Raises ``_Lost`` on UNAVAILABLE when resumable, else the error; the caller ends the stream.
        """
        budget = self.connection.deadline_s(kind)
        end = time.monotonic() + budget
        assembler = TensorAssembler("hidden", UNLIMITED, allow_compression=self.compression != NONE)
        received = 0
        while not assembler.complete:
            try:
                item = self._responses.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise self.connection.not_answering(budget, kind) from None
            if item is _END:
                raise ProtocolError("the server ended the inference stream")
            if isinstance(item, grpc.RpcError):
                code = item.code() if hasattr(item, "code") else grpc.StatusCode.UNKNOWN
                details = (item.details() if hasattr(item, "details") else str(item)) or ""
                if code == grpc.StatusCode.UNAVAILABLE and self._resumable():
                    raise _Lost(details)
                if code == grpc.StatusCode.UNAVAILABLE and keepalive_failed(details):
                    raise self.connection.not_answering(budget - (end - time.monotonic()), kind, keepalive=True)
                raise RemoteError(code.name, details)
            received += item.ByteSize()
            assembler.add(item.hidden)
        return assembler.tensor(), received

    def _resumable(self) -> bool:
        return self.reopen is not None and self.connection.config.timeouts.reconnect_timeout_s > 0

    def _fail(self) -> None:
        self._closed = True
        self._log.clear()
        self._drop()

    def _resume(self, lost: _Lost) -> tuple[torch.Tensor, int]:
        """Reconnect with backoff, replay the log on a new stream, return the last step's answer.

        Every UNAVAILABLE (the server still down, or lost again during the replay) waits and tries
        again until ``reconnect_timeout_s`` has passed since the loss; then ``RemoteError``.
        """
        assert self.reopen is not None
        window = self.connection.config.timeouts.reconnect_timeout_s
        address = self.connection.config.address
        end = time.monotonic() + window
        delay = 0.5
        reason = lost.details
        while True:
            self._drop()
            try:
                self.connection, session_id = self.reopen(max(0.1, end - time.monotonic()))
                self._open(session_id)
                sent = 0
                for request in self._log:
                    sent += request.ByteSize()
                    self._requests.put(request)
                received = 0
                for _ in range(self._steps - 1):  # answers already used: they rebuild the cache, no more
                    received += self._receive("step")[1]
                out, last = self._receive("step")
                self.connection.meter.record("generate_replay", sent=sent, received=received)
                self.resumes += 1
                return out, last
            except _Lost as again:
                reason = again.details
            except RemoteError as err:
                if err.code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    raise
                reason = err.message
            except ProtocolError as err:  # e.g. the trunk adapter the server had trained is gone
                raise RemoteError(
                    "UNAVAILABLE", f"server {address} lost mid-generation ({reason}) and it cannot resume: {err}"
                ) from None
            if time.monotonic() + delay > end:
                raise RemoteError(
                    "UNAVAILABLE",
                    f"server {address} lost mid-generation and not back within {window:.0f} s "
                    f"(reconnect_timeout_s): {reason}",
                ) from None
            time.sleep(delay)
            delay = min(2 * delay, 5.0)

    def rewind(self, length: int) -> None:
        """Ask the server to truncate the trunk's cache to ``length`` slots (no round trip)."""
        if self._closed:
            raise ProtocolError("the inference stream is closed")
        if length < 0:  # a uint32 on the wire; the server checks the rest (0, beyond its cache, ...)
            raise InvalidInputError(REWIND_FIELD, f"must be a slot count >= 0 to be sent, got {length}")
        message = pb.GenerateRequest(rewind=pb.GenerateRewind(length=length))
        self._unmetered += message.ByteSize()
        self._log.append(message)
        self._requests.put(message)

    def close(self) -> None:
        """End the stream politely (the server frees the cache), waiting at most a control call's deadline."""
        if self._closed:
            return
        self._closed = True
        self._log.clear()
        shaper = self.connection.config.shaper
        # The close and the server's end of the stream are a round trip on a real link: emulated.
        shaper.wait(0)
        self._requests.put(pb.GenerateRequest(close=pb.GenerateClose()))
        self._requests.put(_END)
        end = time.monotonic() + self.connection.deadline_s("call")
        try:
            while True:
                item = self._responses.get(timeout=max(0.0, end - time.monotonic()))
                if item is _END or isinstance(item, grpc.RpcError):
                    shaper.wait(0, downlink=True)
                    return
        except queue.Empty:
            self._call.cancel()

    def abandon(self) -> None:
        """Drop the stream without closing it (what a crashed client does); for tests."""
        self._closed = True
        self._log.clear()
        self._call.cancel()
