"""A multi-tenant trunk: concurrent inference streams' steps joined into one trunk pass.

Many clients generate at once, each stream with its own session's LoRA adapter, KV cache and
length. ``JointScheduler`` collects the steps (decode steps and prefills) that arrive on the
event loop and runs them on the compute thread as one pass (``fedsea.model.joint``: per-row
adapters, attention on each stream's own cache), so the shared blocks' weights are read once
for all of them instead of once per stream.

Continuous batching: there is no fixed batch. While a pass computes, the steps that arrive
queue; when it ends, everything queued (up to ``max_joint_tokens``) is the next pass. Streams
join at their prefill and leave when they close, between passes; a stream's next step can only
come after its previous answer, so a pass holds at most one step per stream. ``joint_wait_ms``
(default 0) optionally holds a pass briefly when fewer steps have queued than streams are open.

When one step is queued it runs exactly as before (``GenerationHost.step``): one stream alone
pays nothing for the scheduler but an event-loop hop. Steps of streams whose sessions cut the
model at other points (other trunk blocks) run as separate passes, one per block range. A
step refused by its checks (its stream's step number, lengths, limits, NaN) fails alone; an
error inside a joint pass fails the steps of that pass.

Memory: no cache is copied or padded; each stream's cache stays within the reservation its
prefill was admitted with (``max_cache_bytes``, ``max_cache_bytes_per_client``). A pass adds
only its activations, bounded by ``max_joint_tokens``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsea.limits import ServerLimits
from fedsea.model.device import to_host
from fedsea.model.joint import JointInput, joint_forward
from fedsea.model.masks import check_finite
from fedsea.server.generation import GenerationHost, GenStream
from fedsea.server.trunk import Session

Result = torch.Tensor | BaseException
logger = logging.getLogger(__name__)


@dataclass
class _Step:
    stream: GenStream
    step: int
    hidden: torch.Tensor  # (B, n, d) on the host, as the wire gave it
    lengths: list[int]
    keep_rows: list[int]
    future: asyncio.Future[tuple[torch.Tensor, float]]

    @property
    def tokens(self) -> int:
        return int(self.hidden.shape[0] * self.hidden.shape[1])


@dataclass
class JointStats:
    """What the scheduler ran: trunk passes for inference steps, and how many streams shared them."""

    passes: int = 0  # trunk passes run for inference steps (alone or joint)
    joint_passes: int = 0  # passes that carried the steps of two streams or more
    joint_steps: int = 0  # steps computed inside joint passes
    max_streams: int = 0  # most streams in one pass
    sizes: dict[int, int] = field(default_factory=dict)  # streams per pass -> passes

    def summary(self) -> str:
        """One line: the passes, how many were joint, the steps they carried, the largest."""
        return (
            f"inference passes: {self.passes} ({self.joint_passes} joint, carrying {self.joint_steps} steps; "
            f"up to {self.max_streams} streams in one)"
        )

    def record(self, streams: int) -> None:
        """Count one pass of ``streams`` streams."""
        self.passes += 1
        self.sizes[streams] = self.sizes.get(streams, 0) + 1
        self.max_streams = max(self.max_streams, streams)
        if streams > 1:
            self.joint_passes += 1
            self.joint_steps += streams


class JointScheduler:
    """Continuous batching of inference steps over a ``GenerationHost``.

    Args:
        generation: the streams and their host.
        compute: runs a blocking call on the server's compute thread; returns (result, seconds).
        limits: ``max_joint_tokens`` and ``joint_wait_ms``.
    """

    def __init__(
        self,
        generation: GenerationHost,
        compute: Callable[..., Awaitable[tuple[Any, float]]],
        limits: ServerLimits,
    ) -> None:
        self.generation = generation
        self.host = generation.host
        self._compute = compute
        self.max_tokens = limits.max_joint_tokens
        self.wait_s = limits.joint_wait_ms / 1000.0
        self._queue: list[_Step] = []
        self._runner: asyncio.Task[None] | None = None
        self.stats = JointStats()
        self._logged = 0  # ``stats.joint_passes`` when the summary was last logged

    async def step(
        self, stream: GenStream, step: int, hidden: torch.Tensor, lengths: list[int], keep_rows: list[int]
    ) -> tuple[torch.Tensor, float]:
        """Queue one step of ``stream``; returns its (B, n, d) trunk output and the seconds of its pass."""
        loop = asyncio.get_running_loop()
        item = _Step(stream, step, hidden, lengths, keep_rows, loop.create_future())
        self._queue.append(item)
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._drain())
        return await item.future

    def stream_closed(self) -> None:
        """A stream closed: when it was the last one and joint passes ran since, log the passes (one line)."""
        if self.generation.count() == 0 and self.stats.joint_passes != self._logged:
            self._logged = self.stats.joint_passes
            logger.info("%s", self.stats.summary())

    def _take(self) -> list[_Step]:
        """The next pass: queued steps in arrival order within ``max_tokens`` (the first always goes)."""
        batch: list[_Step] = []
        tokens = 0
        streams: set[str] = set()
        rest: list[_Step] = []
        for item in self._queue:
            if item.future.done():  # its call was cancelled (the client went away)
                continue
            fits = not batch or (tokens + item.tokens <= self.max_tokens and item.stream.id not in streams)
            if fits and not rest:
                batch.append(item)
                tokens += item.tokens
                streams.add(item.stream.id)
            else:
                rest.append(item)  # FIFO: what does not fit waits, and so does everything after it
        self._queue = rest
        return batch

    async def _drain(self) -> None:
        while self._queue:
            if self.wait_s > 0 and len(self._queue) < self.generation.count():
                await asyncio.sleep(self.wait_s)
            batch = self._take()
            if not batch:
                continue
            try:
                results, seconds = await self._compute(self._run, batch)
            except asyncio.CancelledError:
                for item in batch:
                    item.future.cancel()
                raise
            except Exception as exc:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for item, result in zip(batch, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result((result, seconds))

    # -- on the compute thread -------------------------------------------------------------------
    def _run(self, batch: list[_Step]) -> list[Result]:
        if len(batch) == 1:  # one stream: the single-session path, unchanged
            item = batch[0]
            self.stats.record(1)
            try:
                return [self.generation.step(item.stream, item.step, item.hidden, item.lengths, item.keep_rows)]
            except Exception as exc:
                return [exc]
        results: list[Result | None] = [None] * len(batch)
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor, Session]]] = {}
        with self.host.computing(), torch.no_grad():
            for i, item in enumerate(batch):
                try:  # each step's own checks: a refused step fails alone
                    lens = self.generation.prepare(item.stream, item.step, item.hidden, item.lengths, item.keep_rows)
                    session = self.host.get(item.stream.owner, item.stream.session.id)  # NOT_FOUND if closed
                    check_finite(item.hidden, "hidden")  # on the host, where the wire put it
                except Exception as exc:
                    results[i] = exc
                    continue
                groups.setdefault((session.trunk.start, session.trunk.end), []).append((i, lens, session))
            for group in groups.values():
                self.stats.record(len(group))
                try:
                    outs = self._pass(batch, group)
                except Exception as exc:
                    for i, _, _ in group:
                        results[i] = exc
                    continue
                for (i, lens, _), out in zip(group, outs, strict=True):
                    self.generation.finish(batch[i].stream, lens)
                    results[i] = out
        return [r if r is not None else RuntimeError("step not computed") for r in results]

    def _pass(self, batch: list[_Step], group: list[tuple[int, torch.Tensor, Session]]) -> list[torch.Tensor]:
        """One trunk pass for ``group``'s steps (indices into ``batch``, prepared); (B_s, n_s, d) each."""
        if len(group) == 1:
            i, lens, _ = group[0]
            return [self.generation.compute(batch[i].stream, batch[i].hidden, lens)]
        model = self.host.model
        first = group[0][2]
        inputs = [
            JointInput(
                batch[i].hidden.to(device=model.device, dtype=model.dtype),
                lens,
                batch[i].stream.cache,
                session.adapter_name,
            )
            for i, lens, session in group
        ]
        # Eval mode (no LoRA dropout), no adapter activated: the pass adds each row's own adapter, and
        # activating one (peft's set_adapter over every LoRA layer of every session) cost a fifth of
        # a 16-session server's time.
        with self.host.computing(training=False):
            outs = joint_forward(first.trunk, inputs)
        return [to_host(out) for out in outs]
