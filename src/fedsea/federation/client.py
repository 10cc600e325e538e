"""A client's side of a federated run: join, then per round load, train locally, submit."""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from fedsea.client.split_client import SplitClient
from fedsea.errors import RemoteError
from fedsea.model.adapters import adapter_state_dict, load_adapter_state_dict
from fedsea.privacy.noise import derived_seed
from fedsea.training.batch import Batch
from fedsea.training.data import Example, iterate_batches
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.adapters import assemble_state, submit_messages

logger = logging.getLogger(__name__)


def load_noise_secret(path: str | os.PathLike[str]) -> str:
    """The client's noise secret kept in ``path``: read it, or make one (owner-only file) the first time."""
    file = Path(path)
    if file.exists():
        secret = file.read_text().strip()
        if len(secret) < 32:
            raise ValueError(f"{file} holds no noise secret (expected at least 32 hex characters)")
        return secret
    file.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


@dataclass
class RoundResult:
    """What one round did for this client: selected or not, steps, loss, samples."""

    round: int
    selected: bool
    losses: list[float] = field(default_factory=list)
    samples: int = 0
    bytes_sent: int = 0  # this round's traffic, all RPCs
    bytes_received: int = 0
    submitted: bool = True  # False: the round closed before this update arrived (left out of the average)


class FederatedClient:
    """Drives a connected ``SplitClient`` through the rounds of the server's run.

    Args:
        client: a connected ``SplitClient`` (its split carries LoRA on head and tail).
        examples: the client's local data.
        batch_size: examples per local step.
        name: used to derive this client's seeds (data order, noise) per round.
        on_step: called with (round, step, loss) after every local step.
        noise_secret: mixed into the noise seeds and never sent. The run seed and the client's
            name are known to the server, so noise seeded from them alone could be regenerated
            and subtracted there. ``None`` draws a fresh secret (a resumed run then draws other
            noise); pass the same secret again, e.g. from ``load_noise_secret``, for a
            bit-identical resume.
        seed: the run's seed, used until ``join`` returns the server's (a Flower run never joins).
    """

    def __init__(
        self,
        client: SplitClient,
        examples: Sequence[Example],
        batch_size: int,
        name: str,
        on_step: Callable[[int, int, float], None] | None = None,
        progress: bool = False,
        on_round: Callable[[RoundResult], None] | None = None,
        noise_secret: str | None = None,
        seed: int = 0,
    ) -> None:
        if client.connection is None or client.trainer is None:
            raise ValueError("connect the SplitClient first")
        self.client = client
        self.examples = list(examples)
        self.batch_size = batch_size
        self.name = name
        self.on_step = on_step
        self.on_round = on_round
        self.progress = progress
        self.noise_secret = noise_secret if noise_secret is not None else secrets.token_hex(32)
        self.info: pb.JoinResponse | None = None
        self.history: list[RoundResult] = []
        self.seed = seed  # the run's seed before a join tells it (a Flower run sets it from its config)

    @property
    def run_seed(self) -> int:
        """The run's seed: the server's (``join``), else the one given."""
        return int(self.info.seed) if self.info is not None else self.seed

    def join(self) -> pb.JoinResponse:
        """Join the server's run with this client's training session; returns the run's shape."""
        connection, session_id = self.client.require_connection()
        request = pb.JoinRequest(session_id=session_id, num_samples=len(self.examples))
        self.info = connection.unary("join", connection.stub.JoinRun, request)
        return self.info

    def _await(self, after: int) -> tuple[pb.RoundMessage, dict[str, torch.Tensor]]:
        connection, _ = self.client.require_connection()
        request = pb.RoundRequest(after_round=after)
        # A round may be long in coming: this wait has its own deadline (``round_timeout_s`` of
        # ``ClientTimeouts``), and keepalive notices a dead server sooner.
        messages = connection.collect("await_round", connection.stub.AwaitRound, request, kind="round")
        return messages[0], assemble_state((m.tensor for m in messages[1:]), "global")

    def _submit(self, round_number: int, samples: int, loss: float) -> None:
        connection, _ = self.client.require_connection()
        state = {**adapter_state_dict(self.client.split.head), **adapter_state_dict(self.client.split.tail)}

        def requests() -> Iterator[pb.SubmitChunk]:
            return submit_messages(round_number, samples, loss, state)

        connection.stream("submit", connection.stub.SubmitUpdate, requests, kind="adapter")

    def _batches(self, round_number: int, steps: int) -> Iterator[Batch]:
        seed = derived_seed(self.run_seed, self.name, round_number)
        epochs = math.ceil(steps * self.batch_size / max(1, len(self.examples))) + 1
        pad = self.client.split.model.config.pad_token_id or 0
        batches = iterate_batches(self.examples, self.batch_size, pad, epochs=epochs, seed=seed)
        for _, batch in zip(range(steps), batches, strict=False):
            yield batch

    def _start_round(self, round_number: int, state: dict[str, torch.Tensor]) -> None:
        split = self.client.split
        for part in (split.head, split.tail):
            load_adapter_state_dict(part, state, strict=False)
        # Local optimizers restart every round; the noise and data order are seeded per round,
        # the noise also by the secret (the server knows the run seed, the name and the round).
        self.client.reset_optimizers()
        run_seed = self.run_seed
        self.client.reseed_noise(self.noise_secret, run_seed, self.name, round_number)
        generator = getattr(self.client.head_regularizer, "generator", None)
        if isinstance(generator, torch.Generator):  # NoPeek's subsampling
            generator.manual_seed(derived_seed(run_seed, self.name, round_number, "regularizer"))
        torch.manual_seed(derived_seed(run_seed, self.name, round_number, "torch"))

    def train_round(self, round_number: int, local_steps: int, state: dict[str, torch.Tensor]) -> RoundResult:
        """One round's local work: load the global head/tail ``state``, reseed, take ``local_steps`` steps.

        The same for the native run (``run``) and a Flower ClientApp (``fedsea.flower``): the
        trunk's adapter is the server's business (loaded into this client's session before).
        """
        self._start_round(round_number, state)
        result = RoundResult(round_number, True)
        # Closed on an error too (a server not answering): the error is then the last line.
        with tqdm(total=local_steps, desc=f"{self.name} round {round_number}", disable=not self.progress,
                  leave=False) as bar:  # fmt: skip
            for step, batch in enumerate(self._batches(round_number, local_steps)):
                loss = self.client.train_step(batch).loss
                result.losses.append(loss)
                result.samples += int(batch.input_ids.shape[0])
                if self.on_step is not None:
                    self.on_step(round_number, step, loss)
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}")
        return result

    def run(self) -> list[RoundResult]:
        """Join (if not yet) and take part in rounds until the run is over."""
        info = self.info or self.join()
        last = info.next_round - 1
        while True:
            message, state = self._await(last)
            if message.finished:
                return self.history
            last = message.round
            if not message.selected:
                self.history.append(RoundResult(message.round, False))
                continue
            meter = self.client.connection.meter if self.client.connection else None
            before = (meter.bytes_sent, meter.bytes_received) if meter else (0, 0)
            result = self.train_round(message.round, message.local_steps, state)
            mean = sum(result.losses) / len(result.losses)
            try:
                self._submit(message.round, result.samples, mean)
            except RemoteError as err:
                if err.code != "FAILED_PRECONDITION":
                    raise
                # Too late: the round closed without this update (round timeout) and the server
                # left this client out of the pool. The run goes on; join again for later rounds.
                logger.warning("%s: round %d update not taken (%s); rejoining for the next round", self.name,
                               message.round, err.message)  # fmt: skip
                result.submitted = False
                self.join()
            if meter is not None:
                result.bytes_sent = meter.bytes_sent - before[0]
                result.bytes_received = meter.bytes_received - before[1]
            self.history.append(result)
            if self.on_round is not None:
                self.on_round(result)
