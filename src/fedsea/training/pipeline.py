"""Pipelined training steps: one batch sent to the trunk as several micro-batches.

With ``micro_batches = m > 1`` a client's step slices its batch of B rows along the batch
dimension into m micro-batches (``torch.tensor_split``: B = 5, m = 2 gives 3 + 2 rows) and
streams them: the head forward of slice i + 1 runs while slice i is on the wire or in the
trunk, the tail of slice i runs as soon as its trunk output is back, and its gradient goes up
at once, so the trunk's backward of one slice overlaps the transfer of the next.

Exactness: every slice's loss is its *sum* of token losses over the token count of the whole
batch, so the slices' losses add up to the batch's mean loss and their gradients to the
batch's gradient (up to the order of the additions in the last bits). Nothing steps before
every slice's backward is done: the client's optimizers after the step, the trunk's after its
last slice (``MicroStep`` sums the slices' gradients in slice order, whatever order they came
in). Each slice is trimmed to its own longest row (left padding: only padding columns go),
which changes no real token's value and sends fewer bytes.

Noise: every slice's h_p goes through the privatizer on its own, so each gets fresh noise
(from the same seeded generator, drawn slice after slice); the noised values therefore differ
from an unsplit step's draws, with the same distribution. LoRA dropout masks come from the
global RNG in another order too: a pipelined step equals an unsplit one when dropout is 0 and
the noise is off (tested), and is as random as one otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from fedsea.errors import InvalidInputError, ProtocolError
from fedsea.model.masks import check_finite
from fedsea.training.batch import Batch, lm_loss

# A privatizer as the step uses it: h (B, n, d) and a payload key -> the noised payload.
Noiser = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MicroIndex:
    """Slice ``index`` of a step sent as ``count`` micro-batches."""

    index: int
    count: int


def check_micro_batches(count: int, batch_size: int | None = None) -> None:
    """Refuse a micro-batch count below 1 or above the batch size (``ValueError`` naming the setting)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"micro_batches must be an integer >= 1, got {count!r}")
    if batch_size is not None and count > batch_size:
        raise ValueError(f"micro_batches={count} exceeds the batch size {batch_size}: every micro-batch needs a row")


def split_batch(batch: Batch, count: int) -> list[Batch]:
    """``batch`` (B rows) as ``count`` micro-batches of consecutive rows, each trimmed to its longest row.

    Sizes follow ``torch.tensor_split`` (the first B mod count slices get one row more).
    """
    check_micro_batches(count, int(batch.input_ids.shape[0]))
    parts = []
    ids = torch.tensor_split(batch.input_ids, count, dim=0)  # count x (B_i, n)
    lengths = torch.tensor_split(batch.lengths, count, dim=0)  # count x (B_i,)
    labels = torch.tensor_split(batch.labels, count, dim=0)  # count x (B_i, n)
    for ids_i, lengths_i, labels_i in zip(ids, lengths, labels, strict=True):
        # Left padding: the first n - max(lengths_i) columns are padding in every row of the slice.
        keep = int(lengths_i.max())
        parts.append(Batch(ids_i[:, -keep:], lengths_i, labels_i[:, -keep:]))
    return parts


class MicroTrunkLink(Protocol):
    """A trunk link that takes a step as micro-batches, each call answered by a future."""

    def submit_forward(self, hidden: torch.Tensor, lengths: torch.Tensor, micro: MicroIndex) -> Future[torch.Tensor]:
        """Send slice ``micro`` of h~_p (B_i, n_i, d) and its lengths (B_i,); the future gives h_{L-q} (B_i, n_i, d)."""
        ...

    def submit_backward(self, grad: torch.Tensor, micro: MicroIndex, update: bool) -> Future[torch.Tensor]:
        """Send slice ``micro`` of dL/dh_{L-q} (B_i, n_i, d); the future gives dL/dh~_p (B_i, n_i, d).

        ``update`` steps the trunk's optimizer once, after the last slice's backward.
        """
        ...

    def finish_step(self) -> None:
        """Every slice's backward of the step came back: the next step begins."""
        ...


@dataclass
class _Graph:
    inp: torch.Tensor  # (B_i, n_i, d), requires grad
    out: torch.Tensor  # (B_i, n_i, d), graph to inp and the adapter


@dataclass
class MicroStep:
    """The trunk's side of one step in ``count`` micro-batches (``count = 1``: an unsplit step).

    Keeps one autograd graph per slice until its backward, then that slice's parameter
    gradients and its answer (for resends); once every slice's backward is done,
    ``accumulate`` sums the gradients in slice order into ``.grad``. A forward of a slice again
    (a retry of the step) restarts that slice.
    """

    step: int
    count: int
    params: Sequence[nn.Parameter]
    graphs: dict[int, _Graph] = field(default_factory=dict)
    grads: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)
    answers: dict[int, torch.Tensor] = field(default_factory=dict)

    def check_index(self, micro: int, count: int) -> None:
        """Refuse a slice of another count, or an index out of range (``InvalidInputError``)."""
        if count != self.count:
            raise InvalidInputError(
                "micro_batches", f"{count} for step {self.step}, which its first micro-batch sent as {self.count}"
            )
        if not 0 <= micro < self.count:
            raise InvalidInputError("micro_batch", f"index {micro} out of range [0, {self.count})")

    @property
    def rows(self) -> int:
        """Rows of the slices forwarded so far (graphs pending or answered)."""
        return sum(int(g.inp.shape[0]) for g in self.graphs.values()) + sum(
            int(a.shape[0]) for a in self.answers.values()
        )

    def slice_rows(self, micro: int) -> int:
        """Rows of slice ``micro`` if it was forwarded (0 if not)."""
        if micro in self.graphs:
            return int(self.graphs[micro].inp.shape[0])
        return int(self.answers[micro].shape[0]) if micro in self.answers else 0

    def add_forward(self, micro: int, inp: torch.Tensor, out: torch.Tensor) -> None:
        """Keep slice ``micro``'s graph: ``inp`` (B_i, n_i, d) requires grad, ``out`` (B_i, n_i, d) from it."""
        self.answers.pop(micro, None)
        self.grads.pop(micro, None)
        self.graphs[micro] = _Graph(inp, out)

    def backward(self, micro: int, grad: torch.Tensor) -> torch.Tensor:
        """dL/dh_{L-q} of slice ``micro`` (B_i, n_i, d) -> its dL/dh~_p (B_i, n_i, d); a resend gets the same answer."""
        if micro in self.answers:
            return self.answers[micro]
        graph = self.graphs.get(micro)
        if graph is None:
            raise InvalidInputError(
                "micro_batch", f"backward for micro-batch {micro} of step {self.step}, whose forward never came"
            )
        if tuple(grad.shape) != tuple(graph.out.shape):
            raise InvalidInputError("grad", f"expected shape {tuple(graph.out.shape)}, got {tuple(grad.shape)}")
        # Checked where the graph is (on a GPU: cheap, on an idle stream; see ``TrunkHost.forward``).
        grad = grad.to(device=graph.out.device, dtype=graph.out.dtype)
        check_finite(grad, "grad")
        # Each slice's gradients alone (another slice's stay aside): summed later in slice order.
        for p in self.params:
            p.grad = None
        graph.out.backward(grad)
        if graph.inp.grad is None:
            raise ProtocolError("no gradient reached the trunk's input")
        self.grads[micro] = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        answer = graph.inp.grad.detach()
        del self.graphs[micro]
        self.answers[micro] = answer
        return answer

    @property
    def missing(self) -> list[int]:
        """Slices whose backward has not been done yet."""
        return [i for i in range(self.count) if i not in self.answers]

    def accumulate(self) -> None:
        """Every slice's parameter gradients summed in slice order into ``.grad`` (one slice: its own, as is)."""
        if self.missing:
            raise ProtocolError(f"step {self.step} still misses the backward of micro-batches {self.missing}")
        for k, p in enumerate(self.params):
            parts = [g for i in range(self.count) if (g := self.grads[i][k]) is not None]
            total: torch.Tensor | None = None
            for part in parts:
                total = part if total is None else total + part
            p.grad = total

    def release(self) -> None:
        """Drop the slices' gradients once the update they were summed for is done (answers stay for resends).

        Not part of ``accumulate``: if the update fails (out of memory), a resent slice sums them again.
        """
        self.grads.clear()


def pipelined_forward_backward(
    head: nn.Module,
    tail: nn.Module,
    link: MicroTrunkLink,
    batch: Batch,
    count: int,
    privatizer: Noiser,
    grad_privatizer: Noiser | None,
    step_key: Hashable,
    update_remote: bool,
) -> torch.Tensor:
    """One step's forward and backward as ``count`` micro-batches; returns the batch's mean loss.

    Three phases on this thread while the link's calls run on others: (1) head forward of
    every slice, each sent as soon as computed; (2) in slice order, the tail forward and
    backward of each slice as its trunk output arrives, its gradient sent at once; (3) the head
    backward of each slice as its gradient arrives. Gradients accumulate in ``.grad``.
    """
    slices = split_batch(batch, count)
    total = batch.num_targets  # the whole batch's target tokens: each slice's loss is its sum over this
    sent: list[torch.Tensor] = []  # the noised h~_p of each slice (B_i, n_i, d), graph to the head
    forwards: list[Future[torch.Tensor]] = []
    backwards: list[Future[torch.Tensor]] = []
    try:
        for i, part in enumerate(slices):
            h = head(part.input_ids, part.lengths)  # (B_i, n_i, d)
            h_noised = privatizer(h, key=(step_key, i))  # fresh noise per slice; the payload of its retries
            forwards.append(link.submit_forward(h_noised.detach(), part.lengths, MicroIndex(i, count)))
            sent.append(h_noised)
        loss = torch.zeros(())
        for i, part in enumerate(slices):
            received = forwards[i].result().detach().requires_grad_(True)  # h_{L-q} (B_i, n_i, d)
            part_loss = lm_loss(tail(received, part.lengths), part.labels, num_targets=total)
            part_loss.backward()
            assert received.grad is not None
            grad_out = received.grad  # dL/dh_{L-q} (B_i, n_i, d), already scaled by 1/total
            if grad_privatizer is not None:
                grad_out = grad_privatizer(grad_out, key=(step_key, i))
            backwards.append(link.submit_backward(grad_out, MicroIndex(i, count), update_remote))
            loss = loss + part_loss.detach().cpu()
        for h_noised, future in zip(sent, backwards, strict=True):
            # dL/dh~_p (B_i, n_i, d) into the head, while the trunk goes backward through the next slices.
            h_noised.backward(future.result())
    except BaseException:
        for future in (*forwards, *backwards):  # let no call outlive the step; the first error is raised
            with contextlib.suppress(BaseException):  # already failing with the error that stopped the step
                future.result()
        raise
    link.finish_step()
    return loss
