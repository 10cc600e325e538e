"""A client's concurrent generations share head and tail passes: ``JointParts``.

A client that generates several answers at once (``fedsea openai`` answering concurrent
requests, a batch job with a thread per prompt, many sessions of one organisation) runs one
``SplitDecoder`` per answer, each with its own KV caches and its own trunk stream. Alone, each
decoder's step reads every weight of the head, the tail and the LM head once (for SmolLM2 at
(2, 2), ~180 MB a token in fp32: four blocks and a 49,152 x 576 LM head); on a CPU that is
memory-bound, so 16 answers at once read 16 times the bytes for 16 tokens. ``JointParts`` joins
the calls that are waiting at the same moment into one pass, as the multi-tenant trunk does for
the server's blocks (``fedsea.model.joint``): token rows of every decoder through the blocks at
once, attention on each decoder's own cache, then one final norm and LM head over all the
kept rows.

Design decisions:
- **Combining, not a scheduler thread.** The decoders' threads call ``head`` / ``tail`` as
  before; a call that finds no pass of that part running runs one (the leader) with every call
  queued by then, and the others wait for their result (flat combining). No thread of our own,
  nothing to start or stop, and a lone decoder runs its call directly.
- **A wait for the others.** A leader that sees fewer calls queued than threads running
  decoders waits up to ``wait_ms`` (default 40 ms) for the rest before it runs. Threads, not
  decoders: generators interleaved in one thread can only call one at a time, so they are never
  waited for. Once a client's answers have met in one pass they stay in step (they reach the
  trunk together, and the server answers them from one joint pass), so the wait is paid only
  when an answer starts or falls out of step. Measured with ``fedsea bench serve`` (4 clients of
  4 sessions, BENCHMARKS.md): a client pass carried 1.8 of its 4 calls with a 2 ms wait, 3.1
  with 20 ms and 3.4 with 40 ms, and the clients' CPU fell from 11.1 s to 6.5 s. Threads that
  have ended or not called for ``IDLE_S`` (2 s: a consumer pausing a stream) are not waited for.
- **Same adapters for all.** One client's decoders share its head and tail modules and their
  LoRA adapter (the one the part has active), so the pass needs no per-row adapters.
- **Exactness.** A lone call is the part's own forward, bit for bit. A joint pass computes each
  row as that call would, up to float rounding (the projections run on more rows at once), as
  on the server; greedy answers have matched running alone in every benchmark so far.
- A call whose own input is bad (ids out of range, lengths that do not fit its cache) fails
  alone; an error inside a joint pass fails the calls of that pass.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from fedsea.model.joint import JointInput, joint_forward
from fedsea.model.masks import check_lengths
from fedsea.model.split import SplitModel, SplitPart

# How long a pass's leader waits for the calls of the other running decoders, in milliseconds.
DEFAULT_WAIT_MS = 40.0
# A thread whose decoders have not called for this long (a paused consumer) is not waited for, in seconds.
IDLE_S = 2.0


def _result(call: _Call) -> torch.Tensor:
    if isinstance(call.result, BaseException):
        raise call.result
    assert call.result is not None
    return call.result


@dataclass(eq=False)  # compared by identity (a queue's ``remove``), not by its tensors
class _Call:
    """One decoder's call: its input (token ids for the head, trunk states for the tail) and result."""

    data: torch.Tensor  # head: (B, n) ids; tail: (B, n, d) states
    lengths: torch.Tensor  # (B,) real tokens, cached past included
    cache: DynamicCache | None
    keep: int = 0  # tail: logits of the last ``keep`` slots (0: all)
    done: bool = False
    result: torch.Tensor | BaseException | None = field(default=None, repr=False)


@dataclass
class JointStats:
    """Passes run per part and the calls they carried (``calls / passes`` is the mean join)."""

    passes: dict[str, int] = field(default_factory=lambda: {"head": 0, "tail": 0})
    calls: dict[str, int] = field(default_factory=lambda: {"head": 0, "tail": 0})
    most: int = 0  # most calls in one pass


class JointParts:
    """Joins concurrent ``SplitDecoder`` calls to one client's head and tail (see the module doc).

    Use ``joint_parts(split)``: one per ``SplitModel``, shared by every decoder built on it.

    Attributes:
        enabled: False runs every call alone (as before this existed), for side-by-side benchmarks.
        wait_ms: a leader's longest wait for the other running decoders' calls.
    """

    def __init__(self, split: SplitModel, wait_ms: float = DEFAULT_WAIT_MS) -> None:
        self.head, self.tail = split.head, split.tail
        self.enabled = True
        self.wait_ms = wait_ms
        self.stats = JointStats()
        self._cv = threading.Condition()  # re-entrant (an RLock): a finalizer may run inside it
        self._queues: dict[str, list[_Call]] = {"head": [], "tail": []}
        self._running = {"head": False, "tail": False}
        # Open decoders: token -> (the thread that steps it, when it last called). Plain ints as
        # keys (tokens, never reused); closes and finalizers only append to ``_closed``, which is
        # drained under the lock: a garbage collection inside an iteration cannot resize the dict.
        self._open: dict[int, tuple[int, float]] = {}
        self._closed: collections.deque[int] = collections.deque()
        self._tokens = itertools.count(1)

    # -- the decoders' side ------------------------------------------------------------------
    def open(self, decoder: object) -> int:
        """Count ``decoder`` among the running ones (a leader waits for its thread's calls); returns
        its token for ``close`` and the ``run_*`` calls. A decoder collected unclosed is forgotten."""
        token = next(self._tokens)
        weakref.finalize(decoder, self._closed.append, token)
        with self._cv:
            self._open[token] = (threading.get_ident(), time.monotonic())
        return token

    def close(self, token: int) -> None:
        """The decoder of ``token`` is done: no leader waits for it any more."""
        self._closed.append(token)
        with self._cv:
            self._cv.notify_all()

    def run_head(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, cache: DynamicCache | None, owner: int | None = None
    ) -> torch.Tensor:
        """``head(input_ids, lengths, cache=cache)``, joined with other decoders' calls: h_p (B, n, d).

        ``owner``: the calling decoder's token (its thread and time are noted).
        """
        if not self.enabled:
            out: torch.Tensor = self.head(input_ids, lengths, cache=cache)
            return out
        return self._submit("head", _Call(input_ids, lengths, cache), owner)

    def run_tail(
        self,
        hidden: torch.Tensor,
        lengths: torch.Tensor,
        cache: DynamicCache | None,
        keep: int = 0,
        owner: int | None = None,
    ) -> torch.Tensor:
        """``tail(hidden, lengths, cache=cache, logits_to_keep=keep)``, joined: logits (B, keep|n, V)."""
        if not self.enabled:
            out: torch.Tensor = self.tail(hidden, lengths, cache=cache, logits_to_keep=keep)
            return out
        return self._submit("tail", _Call(hidden, lengths, cache, keep), owner)

    # -- combining ---------------------------------------------------------------------------
    def _submit(self, part: str, call: _Call, owner: int | None) -> torch.Tensor:
        queue = self._queues[part]
        with self._cv:
            self._drain()
            if owner is not None and owner in self._open:
                self._open[owner] = (threading.get_ident(), time.monotonic())  # stepped here, now
            queue.append(call)
            self._cv.notify_all()  # a leader gathering calls counts this one
            try:
                while not call.done and self._running[part]:
                    self._cv.wait()
            except BaseException:  # interrupted while waiting: no leader may run this call any more
                if not call.done and call in queue:
                    queue.remove(call)
                raise
            if call.done:
                return _result(call)
            # No pass running: lead one with what is queued (after a short wait for the others).
            self._running[part] = True
            try:
                self._gather(queue)
            except BaseException:  # interrupted before any pass ran: the next caller leads
                queue.remove(call)
                self._running[part] = False
                self._cv.notify_all()
                raise
            batch = list(queue)
            queue.clear()
        failure: BaseException | None = None
        results: list[torch.Tensor | BaseException] = []
        try:
            results = self._pass(part, batch)
        except BaseException as exc:  # the pass failed (or was interrupted): every call in it fails
            failure = exc
        with self._cv:
            for i, item in enumerate(batch):
                if failure is None:
                    item.result = results[i]
                elif item is call:
                    item.result = failure  # the leader raises the original
                else:
                    item.result = RuntimeError(f"the joint {part} pass failed: {failure!r}")
                    item.result.__cause__ = failure
                item.done = True
            self._running[part] = False
            self._cv.notify_all()
        return _result(call)

    def _drain(self) -> None:
        """With the lock held: forget the decoders closed (or collected) since the last call."""
        while self._closed:
            self._open.pop(self._closed.popleft(), None)

    def _expected(self) -> int:
        """With the lock held: calls a leader waits for, one per thread stepping an open decoder.

        Threads, not decoders: generators interleaved in one thread call one at a time. A thread
        that has ended, or has not called for ``IDLE_S`` (a paused consumer), is not waited for.
        """
        self._drain()
        now = time.monotonic()
        alive = {t.ident for t in threading.enumerate()}
        stepping = {t for t, seen in list(self._open.values()) if t in alive and now - seen <= IDLE_S}
        stepping.add(threading.get_ident())
        return len(stepping)

    def _gather(self, queue: list[_Call]) -> None:
        """With the lock held: wait up to ``wait_ms`` until every thread stepping decoders has a call queued."""
        if self.wait_ms <= 0:
            return
        deadline = time.monotonic() + self.wait_ms / 1000.0
        while len(queue) < self._expected():  # counted again after each wake-up (a close, a new call)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(left)

    @torch.no_grad()  # inference only, whatever the leader's thread has set (covers the joint passes too)
    def _pass(self, part: str, batch: list[_Call]) -> list[torch.Tensor | BaseException]:
        """One pass of ``part`` for ``batch``'s calls (outside the lock); a result or an error per call."""
        self.stats.passes[part] += 1
        self.stats.calls[part] += len(batch)
        self.stats.most = max(self.stats.most, len(batch))
        if len(batch) == 1:  # alone: the part's own forward, exactly
            only = batch[0]
            if part == "head":
                return [self.head(only.data, only.lengths, cache=only.cache)]
            return [self.tail(only.data, only.lengths, cache=only.cache, logits_to_keep=only.keep)]
        return _joint_head(self.head, batch) if part == "head" else _joint_tail(self.tail, batch)


def _inputs(
    part: SplitPart, batch: list[_Call], prepare: Callable[[_Call], torch.Tensor]
) -> tuple[list[torch.Tensor | BaseException], list[int], list[JointInput]]:
    """Each call's checked input for the joint pass; a call whose own input is refused gets its error."""
    results: list[torch.Tensor | BaseException] = [RuntimeError("not computed")] * len(batch)
    ok: list[int] = []
    inputs: list[JointInput] = []
    for i, call in enumerate(batch):
        try:
            hidden = prepare(call)
            # The lengths must fit the cache: checked here so that a bad call fails alone.
            past = call.cache.get_seq_length(part.start) if call.cache is not None else 0
            check_lengths(call.lengths, int(hidden.shape[0]), past + int(hidden.shape[1]))
        except Exception as exc:
            results[i] = exc
            continue
        ok.append(i)
        inputs.append(JointInput(hidden, call.lengths, call.cache, None))
    return results, ok, inputs


def _joint_head(head: Any, batch: list[_Call]) -> list[torch.Tensor | BaseException]:
    results, ok, inputs = _inputs(head, batch, lambda call: head.embed(call.data))
    if inputs:
        for i, out in zip(ok, joint_forward(head, inputs, row_adapters=False), strict=True):
            results[i] = out
    return results


def _joint_tail(tail: Any, batch: list[_Call]) -> list[torch.Tensor | BaseException]:
    def checked(call: _Call) -> torch.Tensor:
        tail._check_hidden(call.data, finite=call.data.device.type == "cpu")
        return call.data

    results, ok, inputs = _inputs(tail, batch, checked)
    if not inputs:
        return results
    outs = joint_forward(tail, inputs, row_adapters=False)  # (B_s, n_s, d) each
    # The kept slots of every call as rows of one matrix: one final norm and one LM head for all.
    kept = [out[:, -batch[i].keep :] if batch[i].keep > 0 else out for i, out in zip(ok, outs, strict=True)]
    width = int(kept[0].shape[-1])
    rows = torch.cat([k.reshape(-1, width) for k in kept])  # (sum B_s * keep_s, d)
    logits = tail.cap_logits(tail.lm_head(tail.norm(rows)))  # (rows, V)
    offset = 0
    for i, k in zip(ok, kept, strict=True):
        count = int(k.shape[0] * k.shape[1])
        results[i] = logits[offset : offset + count].reshape(int(k.shape[0]), int(k.shape[1]), -1)
        offset += count
    return results


_PARTS: weakref.WeakKeyDictionary[SplitModel, JointParts] = weakref.WeakKeyDictionary()
_PARTS_LOCK = threading.Lock()


def joint_parts(split: SplitModel) -> JointParts:
    """The ``JointParts`` of ``split``: the same object for every decoder built on it."""
    with _PARTS_LOCK:
        parts = _PARTS.get(split)
        if parts is None:
            parts = _PARTS[split] = JointParts(split)
        return parts
