"""One data owner's side of a federated run, built from the run file: shared by ``fedsea join``
and the Flower ClientApp (``fedsea.flower``), so that both train exactly the same way.

Builds the client's split model with the run's LoRA, calibrates the noise on h_p for the run's
releases, makes the head regularizer, and connects a ``SplitClient`` wrapped in a
``FederatedClient``. What differs between the two callers is only who says when to train.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsea.client.split_client import SplitClient
from fedsea.federation.client import FederatedClient
from fedsea.federation.runconfig import ClientPlan
from fedsea.federation.simconfig import RunPlan, releases_per_token
from fedsea.training.data import Example
from fedsea.wire.shaper import NetShaper


@dataclass
class Participant:
    """A connected client of a run: its ``SplitClient``, the ``FederatedClient`` driving it, its noise."""

    client: SplitClient
    fed: FederatedClient
    noise: Any  # fedsea.privacy.calibration.ResolvedNoise: summary() and the record of the report
    log: Path | None = None  # where its steps and traffic are logged (JSONL), if anywhere
    tokenizer: Any = None  # the public text its noise is calibrated on (again when its cut moves)

    def close(self) -> None:
        """Close the trunk session and the channel."""
        self.client.close()


def build_participant(
    plan: RunPlan,
    me: ClientPlan,
    model: Any,
    examples: Sequence[Example],
    tokenizer: Any,
    address: str,
    *,
    wire: Any,
    token: str | None = None,
    tls: Any = None,
    timeouts: Any = None,
    noise_secret: str | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    on_round: Callable[[Any], None] | None = None,
    progress: bool = False,
) -> Participant:
    """Load ``me``'s split of ``model`` (a ``ModelSettings``), calibrate its noise, connect to ``address``.

    Args:
        wire: the ``WireConfig`` (dtype, compression, emulated latency and bandwidth).
        tls, timeouts: ``ClientTls`` and ``ClientTimeouts`` (None: plaintext, the defaults).
        noise_secret: mixed into the noise seeds, never sent (``load_noise_secret``).
    """
    from fedsea.model.load import load_model
    from fedsea.model.split import split_model
    from fedsea.privacy.calibration import resolve_noise
    from fedsea.privacy.regularizers import make_head_regularizer

    base = load_model(model.source, dtype=model.dtype, device=model.device)
    split = split_model(base, me.head_layers, me.tail_layers).add_lora(plan.lora)
    releases = releases_per_token(plan.fed.rounds, plan.fed.local_steps, me.batch_size, len(examples))
    noise = resolve_noise(dataclasses.replace(plan.noise, releases=releases), split.head, tokenizer)
    embedding = split.head.embed_tokens.weight.detach()  # (V, d) the public embedding
    regularizer = make_head_regularizer(plan.head_regularizer, plan.regularizer_weight, embedding, noise.noise)
    client = SplitClient(
        address, split, noise=noise.noise, grad_noise=plan.grad_noise,
        optim=plan.optim, wire_dtype=wire.dtype, wire_compression=wire.compression, tls=tls,
        head_regularizer=regularizer, token=token, seed=plan.fed.seed,
        shaper=NetShaper(wire.latency_ms, wire.mbps or 0.0), timeouts=timeouts,
    )  # fmt: skip
    client.connect()
    try:
        fed = FederatedClient(
            client, examples, me.batch_size, me.name, on_step=on_step, progress=progress, on_round=on_round,
            noise_secret=noise_secret, seed=plan.fed.seed,
        )  # fmt: skip
    except BaseException:
        client.close()
        raise
    return Participant(client, fed, noise, tokenizer=tokenizer)
