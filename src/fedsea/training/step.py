"""One training step, split or centralized, through the same code.

``SplitTrainer`` runs a client's step: head -> privatize -> trunk -> tail, loss, then the
gradients flow back across both cuts as explicit tensors, exactly what crosses the wire:

    up:   h~_p (B, n, d), lengths (B)          trunk.forward
    down: h_{L-q} (B, n, d)
    up:   dL/dh_{L-q} (B, n, d)                trunk.backward
    down: dL/dh~_p (B, n, d)

The trunk is reached through a ``TrunkLink``: ``LocalTrunk`` here (in-process), a gRPC client
in ``fedsea.client``. ``CentralTrainer`` runs the unsplit model with the same adapters and
the same per-part optimizers and clipping, so that with sigma = 0 both give the same step.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from fedsea.config import NoiseConfig, OptimConfig
from fedsea.model.adapters import adapter_parameters
from fedsea.model.split import SplitModel, central_forward, check_token_ids
from fedsea.privacy.noise import Privatizer, make_privatizer
from fedsea.privacy.regularizers import HeadRegularizer
from fedsea.training.batch import Batch, lm_loss
from fedsea.training.pipeline import (
    MicroIndex,
    MicroStep,
    MicroTrunkLink,
    check_micro_batches,
    pipelined_forward_backward,
)


class TrunkLink(Protocol):
    """How a client reaches the trunk (in-process or over the network)."""

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Send h~_p (B, n, d) and lengths (B,); return h_{L-q} (B, n, d), detached."""
        ...

    def backward(self, grad: torch.Tensor, update: bool = True) -> torch.Tensor:
        """Send dL/dh_{L-q} (B, n, d); return dL/dh~_p (B, n, d). ``update`` steps the trunk's optimizer."""
        ...


def make_optimizer(params: list[nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over ``params`` with the learning rate, betas, eps and weight decay of ``optim``."""
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)


class PartOptimizer:
    """AdamW over one part's LoRA tensors, with that part's own gradient clipping.

    With ``optim.proximal_mu`` > 0 (FedProx), each step adds ``mu * (w - w_0)``, the gradient of
    ``mu/2 ||w - w_0||^2``, to the gradient before clipping; ``w_0`` is a copy of the LoRA
    tensors taken here (a federated round makes the optimizer after loading the global adapter).
    """

    def __init__(self, part: nn.Module, optim: OptimConfig) -> None:
        self.params = list(adapter_parameters(part).values())
        self.max_grad_norm = optim.max_grad_norm
        self.optimizer = make_optimizer(self.params, optim) if self.params else None
        self.proximal_mu = optim.proximal_mu
        # w_0: one detached copy per LoRA tensor, (r, d_in) for A and (d_out, r) for B.
        self.anchor = [p.detach().clone() for p in self.params] if self.proximal_mu > 0 else []

    def step(self) -> float:
        """Clip, step and zero the gradients; return the gradient norm before clipping."""
        if self.optimizer is None:
            return 0.0
        for p, w0 in zip(self.params, self.anchor, strict=False):  # FedProx's term (none when mu = 0)
            pull = (p.detach() - w0) * self.proximal_mu
            p.grad = pull if p.grad is None else p.grad.add_(pull)
        grads = [p for p in self.params if p.grad is not None]
        norm = 0.0
        if grads and self.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def zero_grad(self) -> None:
        """Drop the gradients of the part's LoRA tensors without stepping."""
        for p in self.params:
            p.grad = None


class LocalTrunk:
    """The trunk in the same process: a ``TrunkLink`` without a network."""

    def __init__(self, trunk: nn.Module, optim: OptimConfig) -> None:
        self.trunk = trunk
        self.optimizer = PartOptimizer(trunk, optim)
        self._saved: tuple[torch.Tensor, torch.Tensor] | None = None
        self._micro: MicroStep | None = None  # the step in flight as micro-batches

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """hidden: (B, n, d) h~_p, lengths: (B,); run the trunk in train mode, return h_{L-q} (B, n, d) detached."""
        self.trunk.train()
        inp = hidden.detach().requires_grad_(True)  # (B, n, d)
        out: torch.Tensor = self.trunk(inp, lengths)  # (B, n, d)
        self._saved = (inp, out)
        return out.detach()

    def backward(self, grad: torch.Tensor, update: bool = True) -> torch.Tensor:
        """grad: (B, n, d) dL/dh_{L-q}; backpropagate through the saved forward, return dL/dh~_p (B, n, d)."""
        if self._saved is None:
            raise RuntimeError("trunk.backward called without a pending forward")
        inp, out = self._saved
        self._saved = None
        # As the server does: this step's gradient only (a compute_gradients before must not add to it).
        self.optimizer.zero_grad()
        out.backward(grad)
        if update:
            self.optimizer.step()
        assert inp.grad is not None  # inp requires grad and out depends on it
        return inp.grad

    def submit_forward(self, hidden: torch.Tensor, lengths: torch.Tensor, micro: MicroIndex) -> Future[torch.Tensor]:
        """Slice ``micro`` of h~_p (B_i, n_i, d) -> its h_{L-q} (B_i, n_i, d), computed at once (a done future)."""
        if self._micro is None or micro.index == 0:  # in process, slices come in order: 0 starts a step
            self._micro = MicroStep(0, micro.count, self.optimizer.params)
        self._micro.check_index(micro.index, micro.count)
        self.trunk.train()
        inp = hidden.detach().requires_grad_(True)  # (B_i, n_i, d)
        out: torch.Tensor = self.trunk(inp, lengths)  # (B_i, n_i, d)
        self._micro.add_forward(micro.index, inp, out)
        return _done(out.detach())

    def submit_backward(self, grad: torch.Tensor, micro: MicroIndex, update: bool) -> Future[torch.Tensor]:
        """Slice ``micro`` of dL/dh_{L-q} -> its dL/dh~_p; after the last slice, the summed gradients step once."""
        if self._micro is None:
            raise RuntimeError("trunk.submit_backward called without a pending forward")
        self._micro.check_index(micro.index, micro.count)
        grad_in = self._micro.backward(micro.index, grad)
        if not self._micro.missing:
            self._micro.accumulate()
            if update:
                self.optimizer.step()
            self._micro = None
        return _done(grad_in)

    def finish_step(self) -> None:
        """Nothing to do in process (the last slice's backward has stepped)."""


def _done(value: torch.Tensor) -> Future[torch.Tensor]:
    future: Future[torch.Tensor] = Future()
    future.set_result(value)
    return future


@dataclass(frozen=True)
class StepResult:
    """What one step did: mean loss over its target tokens and their number."""

    loss: float
    num_targets: int


class _Trainer:
    """Shared step logic; subclasses define ``_forward_backward`` and ``_client_optimizers``."""

    _optimizers: list[PartOptimizer]

    def _forward_backward(self, batch: Batch, update_remote: bool) -> torch.Tensor:
        raise NotImplementedError

    def compute_gradients(self, batch: Batch) -> float:
        """Forward and backward without any update: every LoRA tensor's ``.grad`` is filled."""
        for opt in self._optimizers:
            opt.zero_grad()
        return float(self._forward_backward(batch, update_remote=False))

    def train_step(self, batch: Batch) -> StepResult:
        """One optimizer step on ``batch``."""
        for opt in self._optimizers:
            opt.zero_grad()
        loss = float(self._forward_backward(batch, update_remote=True))
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss}; lower the learning rate or the noise")
        for opt in self._optimizers:
            opt.step()
        return StepResult(loss=loss, num_targets=batch.num_targets)


class SplitTrainer(_Trainer):
    """A client's training step through the split.

    Args:
        split: the client's view of the model (head and tail are used here).
        trunk: how to reach the trunk; defaults to ``LocalTrunk(split.trunk)``.
        noise: clipping and Gaussian noise on h_p before it leaves the client.
        optim: AdamW settings, one optimizer per part.
        privatizer: a ready privatizer instead of ``make_privatizer(noise)`` (e.g. shaped noise,
            ``fedsea.privacy.shaped.ShapedPrivatizer``).
        head_regularizer: an extra loss on the head's output that removes token identity
            from h_p (``fedsea.privacy.regularizers``); weight 0 changes nothing.
        grad_noise: optional per-token clipping and Gaussian noise on the gradient the client
            sends up, dL/dh_{L-q} (B, n, d), which depends on the labels and the tail. In
            gradient units: the per-token norms of the mean loss's gradient are small (about
            1e-4 to 1e-2), so set ``clip_norm`` and read sigma relative to it. Not covered by
            the accountant's epsilon (see PRIVACY.md).
        micro_batches: send each step to the trunk as this many micro-batches, pipelined
            (``fedsea.training.pipeline``); 1 is the unsplit step. Needs a trunk link that takes
            micro-batches (``LocalTrunk``, ``RemoteTrunk``) and no head regularizer.
    """

    def __init__(
        self,
        split: SplitModel,
        trunk: TrunkLink | None = None,
        noise: NoiseConfig | None = None,
        optim: OptimConfig | None = None,
        privatizer: Privatizer | None = None,
        head_regularizer: HeadRegularizer | None = None,
        grad_noise: NoiseConfig | None = None,
        micro_batches: int = 1,
    ) -> None:
        check_micro_batches(micro_batches)
        if micro_batches > 1 and head_regularizer is not None:
            raise ValueError(
                f"micro_batches={micro_batches} cannot be combined with a head regularizer: its loss is taken over "
                "the whole batch and does not split into micro-batches (use micro_batches=1)"
            )
        self.micro_batches = micro_batches
        self.optim = optim or OptimConfig()
        self.split = split
        self.trunk: TrunkLink = trunk if trunk is not None else LocalTrunk(split.trunk, self.optim)
        self.noise = noise or NoiseConfig()
        self.grad_noise = grad_noise
        device = split.model.device
        self.privatizer = privatizer or make_privatizer(self.noise, device)
        self.head_regularizer = head_regularizer
        self.grad_privatizer = make_privatizer(grad_noise, device, purpose="grad-noise")
        self.reset_optimizers()
        self.steps = 0

    def reset_optimizers(self) -> None:
        """Fresh AdamW state for head and tail (a federated client's local optimizers restart every round)."""
        self._optimizers = [PartOptimizer(self.split.head, self.optim), PartOptimizer(self.split.tail, self.optim)]

    def reseed_noise(self, secret: str, context: tuple[object, ...]) -> None:
        """Fresh privatizers for h_p and the gradient, seeded from ``secret`` and ``context`` (``make_privatizer``)."""
        device = self.split.model.device
        self.privatizer = make_privatizer(self.noise, device, secret=secret, context=context)
        self.grad_privatizer = make_privatizer(
            self.grad_noise, device, purpose="grad-noise", secret=secret, context=context
        )

    def _forward_backward(self, batch: Batch, update_remote: bool) -> torch.Tensor:
        check_token_ids(batch.input_ids, self.split.head.embed_tokens.num_embeddings)  # free on the CPU
        batch = batch.to(self.split.model.device)  # batches are made on the CPU; no copy there
        head, tail = self.split.head.train(), self.split.tail.train()
        # A short last batch (fewer rows than micro-batches) goes in as many slices as it has rows.
        count = min(self.micro_batches, int(batch.input_ids.shape[0]))
        if count > 1:
            return self._pipelined(batch, update_remote, count)
        h = head(batch.input_ids, batch.lengths)  # (B, n, d)
        if self.head_regularizer is not None:  # same values; carries the extra loss into the backward
            h = self.head_regularizer.attach(h, batch.input_ids, batch.lengths, head.embed_tokens)
        h_noised = self.privatizer(h, key=self.steps)  # the payload; a retry resends it
        trunk_out = self.trunk.forward(h_noised.detach(), batch.lengths)  # (B, n, d)
        received = trunk_out.detach().requires_grad_(True)
        loss = lm_loss(tail(received, batch.lengths), batch.labels)
        loss.backward()
        assert received.grad is not None
        grad_out = received.grad  # dL/dh_{L-q} (B, n, d): what goes up to the trunk
        if self.grad_privatizer is not None:
            grad_out = self.grad_privatizer(grad_out, key=self.steps)  # a retry resends this payload
        grad_in = self.trunk.backward(grad_out, update=update_remote)  # dL/dh~_p (B, n, d)
        h_noised.backward(grad_in)
        self.steps += 1
        return loss.detach()

    def _pipelined(self, batch: Batch, update_remote: bool, count: int) -> torch.Tensor:
        if not hasattr(self.trunk, "submit_forward"):
            raise ValueError(f"micro_batches={self.micro_batches} needs a trunk link that takes micro-batches")
        link: MicroTrunkLink = self.trunk  # type: ignore[assignment]
        loss = pipelined_forward_backward(
            self.split.head,
            self.split.tail,
            link,
            batch,
            count,
            self.privatizer,
            self.grad_privatizer,
            self.steps,
            update_remote,
        )
        self.steps += 1
        return loss


class CentralTrainer(_Trainer):
    """The centralized baseline: the unsplit model, same adapters, same per-part optimizers."""

    def __init__(self, split: SplitModel, optim: OptimConfig | None = None) -> None:
        optim = optim or OptimConfig()
        self.split = split
        self._optimizers = [PartOptimizer(part, optim) for part in split.parts().values()]

    def _forward_backward(self, batch: Batch, update_remote: bool) -> torch.Tensor:
        model = self.split.model.train()
        check_token_ids(batch.input_ids, self.split.head.embed_tokens.num_embeddings)
        batch = batch.to(model.device)
        loss = lm_loss(central_forward(model, batch.input_ids, batch.lengths), batch.labels)
        loss.backward()
        return loss.detach()
