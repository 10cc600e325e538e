"""The trunk host: one frozen base model, many client sessions, no gRPC.

Design decisions:
- One base model in memory; each session gets its own LoRA adapter on the trunk blocks it
  uses, injected by peft under the session's own adapter name into the *shared* blocks.
  Before a session computes, its adapter is made the active one. Compute is serialized by
  one lock, so switching adapters and computing is atomic; other modules (batching,
  generation, the coordinator) compute on the shared blocks inside ``host.computing(...)``.
- A session's (p, q) are data: sessions with different partition points share the blocks.
- The autograd graph of a forward is kept until the matching backward (or until the session
  closes or times out); a resent step is answered again without stepping twice. A step may
  come as m micro-batches (``fedsea.training.pipeline``): one graph per slice, the slices'
  gradients summed in slice order, one optimizer step after the last slice's backward.
- Memory is bounded (issue 14): a trunk LoRA is checked against the limits before it is made;
  a forward's saved activations are measured and budgeted until their backward, and dropped
  ``pending_timeout_s`` after it if the backward never comes (``fedsea.server.memory``).
- Everything a client sends is validated with ``if ... raise`` and typed errors that the
  servicer maps to gRPC status codes (``fedsea.errors`` and ``fedsea.server.service``).
"""

from __future__ import annotations

import secrets
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

from fedsea.config import ServerLimits
from fedsea.errors import (
    InvalidInputError,
    LimitExceededError,
    ModelMismatchError,
    ProtocolError,
    SessionNotFoundError,
    shown,
)
from fedsea.model.adapters import adapter_state_dict, add_lora, load_adapter_state_dict
from fedsea.model.device import to_host
from fedsea.model.fingerprint import model_fingerprint
from fedsea.model.joint import lora_layers
from fedsea.model.masks import check_finite
from fedsea.model.seeding import seeded
from fedsea.model.split import Trunk, check_partition, check_supported
from fedsea.server.memory import (
    ActivationMeter,
    check_hidden,
    check_lora,
    check_pending,
    sized_limits,
    within_pending,
)
from fedsea.server.sessions import Session as Session
from fedsea.server.sessions import SessionSpec as SessionSpec
from fedsea.training.pipeline import MicroStep
from fedsea.training.step import PartOptimizer


class TrunkHost:
    """Sessions over one base model's trunk blocks.

    Args:
        model: the frozen base model (its fingerprint is what clients must match).
        limits: what every request is checked against; memory budgets left at 0 (auto) are
            sized to the memory free beside the trunk's weights (``ServerLimits``).
    """

    def __init__(self, model: PreTrainedModel, limits: ServerLimits | None = None) -> None:
        check_supported(model)
        model.requires_grad_(False)
        self.model = model
        self.limits = sized_limits(limits or ServerLimits(), model)
        self.fingerprint = model_fingerprint(model)
        self.num_layers = int(model.config.num_hidden_layers)
        self.hidden_size = int(model.config.hidden_size)
        self._sessions: dict[str, Session] = {}
        # Two locks, always taken in this order: compute (adapter injection, switching and
        # compute on the shared blocks; held for long) then sessions (the dict; held briefly,
        # so the event loop can look sessions up while a step computes).
        self._compute_lock = threading.RLock()
        self._sessions_lock = threading.RLock()
        # What the shared blocks are set to (under the compute lock): switching adapters and
        # train/eval walks hundreds of modules, ~2.5 ms per call on SmolLM2, which a decode step
        # (one token per row) would pay every time. None = unknown; adapter changes reset it.
        self._active: str | None = None
        self._training: bool | None = None
        self.activations = ActivationMeter(model)  # forwards' saved tensors, measured
        # Called with each session that closes (under the compute lock): frees its streams' buffers.
        self.on_drop: list[Callable[[Session], None]] = []

    # -- sessions ---------------------------------------------------------------------------
    def open_session(self, owner: str, fingerprint: str, spec: SessionSpec) -> Session:
        """Open a training session with a fresh seeded trunk LoRA; the base model's fingerprint must match."""
        if fingerprint != self.fingerprint:
            raise ModelMismatchError(
                f"base model mismatch: the client holds {fingerprint[:23]}..., this server serves "
                f"{self.fingerprint[:23]}... (load the same base model on both sides)"
            )
        check_partition(self.num_layers, spec.head_layers, spec.tail_layers)
        with self._compute_lock, self._sessions_lock:
            mine = sum(1 for s in self._sessions.values() if s.owner == owner)
            if mine >= self.limits.max_sessions_per_client:
                raise LimitExceededError(
                    f"client {owner!r} already has {mine} open sessions (max_sessions_per_client="
                    f"{self.limits.max_sessions_per_client}); close one first"
                )
            if len(self._sessions) >= self.limits.max_sessions:
                raise LimitExceededError(f"the server is full (max_sessions={self.limits.max_sessions})")
            session_id = secrets.token_urlsafe(16)
            trunk = Trunk(self.model, spec.head_layers, self.num_layers - spec.tail_layers)
            check_lora(trunk, spec.lora, self.limits)  # before peft allocates anything
            # Seed the adapter's initialisation without touching the process's global RNG.
            with seeded(spec.seed):
                add_lora(trunk, spec.lora, adapter_name=f"s_{session_id}")
            self.adapters_changed()
            tuners = [m for m in trunk.modules() if isinstance(m, BaseTunerLayer)]
            session = Session(session_id, owner, spec, trunk, PartOptimizer(trunk, spec.optim), tuners)
            self._sessions[session_id] = session
            return session

    def get(self, owner: str, session_id: str) -> Session:
        """The caller's own session; someone else's is as unknown as a missing one."""
        with self._sessions_lock:
            session = self._sessions.get(session_id)
            if session is None or session.owner != owner:
                raise SessionNotFoundError(f"no open session {shown(session_id)} for this client")
            session.last_used = time.monotonic()
            return session

    def close_session(self, owner: str, session_id: str) -> None:
        """Close a session and delete its adapter (NOT_FOUND if it is not the owner's)."""
        with self._compute_lock:
            self._drop(self.get(owner, session_id))

    def _drop(self, session: Session) -> None:
        self._forget_pending(session)
        session.answered = None
        for hook in self.on_drop:
            hook(session)
        with warnings.catch_warnings():  # peft warns when the active adapter goes: expected here
            warnings.simplefilter("ignore", UserWarning)
            for layer in session.tuner_layers:
                layer.delete_adapter(session.adapter_name)
        self.adapters_changed()
        with self._sessions_lock:
            self._sessions.pop(session.id, None)

    def reap_idle(self, now: float | None = None) -> list[str]:
        """Close sessions idle for longer than ``idle_timeout_s``; return their ids."""
        now = time.monotonic() if now is None else now
        with self._compute_lock:
            self.expire_pending(now)
            idle = [s for s in self._sessions.values() if now - s.last_used > self.limits.idle_timeout_s]
            for session in idle:
                self._drop(session)
            return [s.id for s in idle]

    def open_sessions(self, owner: str | None = None) -> int:
        """Open sessions, of one owner or in all."""
        with self._sessions_lock:
            return sum(1 for s in self._sessions.values() if owner is None or s.owner == owner)

    @contextmanager
    def computing(self, session: Session | None = None, training: bool | None = None) -> Iterator[None]:
        """Hold the shared blocks for the block: the compute lock, ``session``'s adapter active.

        ``training`` sets train (True) or eval (False) mode; None leaves the mode as it is.
        Without a session, only the lock is held (e.g. to change a cache or the adapters), and
        the mode set: a joint pass picks each row's adapter itself (``fedsea.model.joint``).
        Re-entrant: a holder may enter again for another session.
        """
        with self._compute_lock:
            if session is not None:
                self._activate(session, training)
            elif training is not None:
                self._set_training(training)
            yield

    def _activate(self, session: Session, training: bool | None = None) -> None:
        """Make ``session``'s adapter the active one (and set train/eval) unless it already is.

        Call with the compute lock held.
        """
        if self._active != session.adapter_name:
            # All LoRA layers of its blocks: one only another session targets would keep that one's adapter on.
            for layer in lora_layers(session.trunk.layers):
                layer.set_adapter(session.adapter_name)
            self._active = session.adapter_name
        if training is not None:
            self._set_training(training)

    def _set_training(self, training: bool) -> None:
        if training is not self._training:
            self.model.model.layers.train(training)  # the shared blocks, every session's view
            self._training = training

    def adapters_changed(self) -> None:
        """Forget the cached state after adapters were added to or deleted from the blocks (new
        LoRA modules start in training mode, and peft may move the active adapter)."""
        self._active = None
        self._training = None
        self.activations.invalidate()

    # -- pending activations (``fedsea.server.memory``) ------------------------------------------
    def _forget_pending(self, session: Session) -> None:
        session.pending = None
        session.pending_bytes.clear()

    def expire_pending(self, now: float | None = None, keep: Session | None = None) -> int:
        """Drop the activations of forwards whose backward is ``pending_timeout_s`` late; return how many.

        ``keep``: the session whose request is being computed (its backward or next slice has
        arrived, however long it then queued for the compute thread: never expired by it).
        """
        now = time.monotonic() if now is None else now
        with self._compute_lock, self._sessions_lock:
            timeout = self.limits.pending_timeout_s
            waiting = [s for s in self._sessions.values() if s.pending is not None and s is not keep]
            late = [s for s in waiting if now - s.pending_at > timeout]
            for session in late:
                session.expired_step = session.pending.step if session.pending is not None else None
                self._forget_pending(session)
            return len(late)

    def pending_bytes(self, owner: str | None = None) -> int:
        """Saved activation bytes of forwards awaiting their backward, of one owner or in all."""
        with self._sessions_lock:
            return sum(sum(s.pending_bytes.values()) for s in self._sessions.values() if owner in (None, s.owner))

    # -- training ---------------------------------------------------------------------------
    def check_hidden_shape(self, shape: tuple[int, ...], field_name: str = "hidden") -> None:
        """Limits and width of a (B, n, d) tensor, checked before its bytes are assembled."""
        check_hidden(shape, self.hidden_size, self.limits, field_name)

    def forward(
        self,
        owner: str,
        session_id: str,
        step: int,
        hidden: torch.Tensor,
        lengths: torch.Tensor,
        micro: int = 0,
        micro_batches: int = 1,
    ) -> torch.Tensor:
        """h~_p (B, n, d) -> h_{L-q} (B, n, d) for step ``step``, slice ``micro`` of ``micro_batches``."""
        self.check_hidden_shape(tuple(hidden.shape))
        count = self._check_micro(micro, micro_batches)
        with self._compute_lock:
            session = self.get(owner, session_id)
            self.expire_pending(keep=session)
            pending = session.pending
            retry = pending is not None and pending.step == step
            if step != session.next_step and not retry:
                missing = ""
                if pending is not None and pending.count > 1:
                    missing = f" (micro-batches {pending.missing} of step {pending.step} wait for their backward)"
                raise ProtocolError(
                    f"forward for step {step}, but the session expects step {session.next_step}{missing}"
                )
            if pending is None or pending.step != step or pending.count != count:
                # A new step, or the same step sent again in another number of slices: nothing
                # of the old one has been applied (the optimizer steps after the last slice).
                pending = MicroStep(step, count, session.optimizer.params)
            pending.check_index(micro, count)
            rows = pending.rows - pending.slice_rows(micro)  # a slice sent again replaces itself
            if rows + hidden.shape[0] > self.limits.max_batch:
                raise LimitExceededError(
                    f"hidden: the micro-batches of step {step} add up to more than "
                    f"max_batch={self.limits.max_batch} rows"
                )
            self._activate(session, training=True)
            # NaN/Inf checked where the model computes: on a GPU a reduction of microseconds and a
            # sync on an idle stream, where the same check on the host costs ~30 ms for a 4 x 512
            # x 4096 bf16 tensor (measured on an H100 server: BENCHMARKS.md, issue 13).
            inp = hidden.to(device=self.model.device, dtype=self.model.dtype)
            check_finite(inp, "hidden")
            # What this slice replaces is freed when it is stored; refuse before computing if
            # the client is already at its budget, and after, with the exact bytes measured.
            old = session.pending_bytes
            old_bytes = old.get(micro, 0) if pending is session.pending else sum(old.values())
            mine, total = self.pending_bytes(owner) - old_bytes, self.pending_bytes() - old_bytes
            blocks, tokens = (session.trunk.start, session.trunk.end), hidden.shape[0] * hidden.shape[1]
            expected = max(1, self.activations.estimate(blocks, tokens))
            check_pending(self.limits, mine + expected, total + expected)
            inp = inp.detach().requires_grad_(True)  # a leaf of its own even when ``hidden`` was already there
            with self.activations.measure(blocks, tokens) as saved:
                out: torch.Tensor = session.trunk(inp, lengths)  # (B, n, d); validates lengths
            if not within_pending(self.limits, mine + saved.bytes, total + saved.bytes):
                del out, inp  # the graph goes now, not with the traceback
                check_pending(self.limits, mine + saved.bytes, total + saved.bytes)
            if pending is not session.pending:
                self._forget_pending(session)
            pending.add_forward(micro, inp, out)
            session.pending = pending
            session.pending_bytes[micro] = saved.bytes
            session.pending_at = time.monotonic()
            session.expired_step = None
            return to_host(out.detach())

    def _check_micro(self, micro: int, micro_batches: int) -> int:
        """The slice count (0 on the wire: an unsplit step), its index in range, at most ``max_batch`` slices."""
        count = max(1, micro_batches)
        if count > self.limits.max_batch:
            raise InvalidInputError(
                "micro_batches", f"{micro_batches} slices exceed max_batch={self.limits.max_batch} rows"
            )
        if not 0 <= micro < count:
            raise InvalidInputError("micro_batch", f"index {micro} out of range [0, {count})")
        return count

    def backward(
        self,
        owner: str,
        session_id: str,
        step: int,
        grad: torch.Tensor,
        update: bool,
        micro: int = 0,
        micro_batches: int = 1,
    ) -> torch.Tensor:
        """dL/dh_{L-q} -> dL/dh~_p of slice ``micro``; then, after the last slice, steps if ``update``."""
        count = self._check_micro(micro, micro_batches)
        with self._compute_lock:
            session = self.get(owner, session_id)
            done = session.answered
            if done is not None and done.step == step and done.count == count and micro in done.answers:
                return to_host(done.answers[micro])  # a resend: same answer, no second update
            self.expire_pending(keep=session)
            pending = session.pending
            if pending is None and session.expired_step == step:
                raise ProtocolError(
                    f"the forward of step {step} waited more than pending_timeout_s="
                    f"{self.limits.pending_timeout_s:g} s for its backward and its activations were "
                    "freed; resend the forward"
                )
            if pending is None or pending.step != step:
                raise ProtocolError(f"backward for step {step} without its forward")
            pending.check_index(micro, count)
            self._activate(session)
            grad_in = to_host(pending.backward(micro, grad))  # checks the shape and NaN/Inf; (B_i, n_i, d)
            session.pending_bytes.pop(micro, None)  # the slice's graph is gone
            if not pending.missing:  # the step's last slice: one update from the slices' summed gradients
                pending.accumulate()
                if update:
                    session.optimizer.step()
                pending.release()
                self._forget_pending(session)
                session.answered = pending
                session.next_step = step + 1
            return grad_in

    # -- adapters -----------------------------------------------------------------------------
    def get_adapter(self, owner: str, session_id: str) -> dict[str, torch.Tensor]:
        """A copy of the session's trunk LoRA tensors, keyed by global block number."""
        with self._compute_lock:
            session = self.get(owner, session_id)
            return adapter_state_dict(session.trunk, session.adapter_name)

    def put_adapter(self, owner: str, session_id: str, state: dict[str, torch.Tensor]) -> int:
        """Load trunk LoRA tensors into the session's adapter; returns how many were loaded."""
        with self._compute_lock:
            session = self.get(owner, session_id)
            try:
                load_adapter_state_dict(session.trunk, state)
            except ValueError as exc:
                raise InvalidInputError("adapter", str(exc)) from exc
            # New weights: the optimizer's moments belonged to the old ones.
            session.optimizer = PartOptimizer(session.trunk, session.spec.optim)
            return len(state)
