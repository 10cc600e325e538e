"""Moving a participant's cut between rounds: re-split its loaded model, recalibrate its noise, reopen its session.

A client whose cut moves from (p, q) to (p', q') keeps its loaded model: every block already
carries its LoRA (the client's split added one LoRA to the head, the trunk and the tail, all of
the same spec), so a new ``SplitModel`` over the same modules is the new cut, with nothing
copied or initialised. What changes with the cut:

- the trunk session: the server's session spans the trunk blocks [p, L - q) it was opened with,
  so the old session is closed and a new one opened at the new cut (its trunk blocks are then
  loaded from the round's stage, as every round's are);
- the noise: its level is relative to h_p's RMS (``relative_sigma``) or bounds h_p's release
  (``epsilon``), and h_p is now the output of another block: recalibrated at p'
  (``resolve_noise``), and the head regularizer (which may use the noise level) made anew;
- the head and tail adapters: the next round's global slice at the new cut is loaded into them
  (``FederatedClient.train_round``); the blocks that changed sides travel through the
  block-keyed global adapter, so no training is lost.

The noise secret, the run's seed and the client's examples stay: each round reseeds the noise
and the data order from them, whatever the cut.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedsea.client.split_client import SplitClient
from fedsea.federation.client import FederatedClient
from fedsea.federation.participant import Participant
from fedsea.federation.simconfig import RunPlan, releases_per_token
from fedsea.model.split import SplitModel

__all__ = ["recut_participant", "resplit"]


def resplit(split: SplitModel, head_layers: int, tail_layers: int) -> SplitModel:
    """``split``'s model, already carrying one LoRA spec on every part, cut at (``head_layers``, ``tail_layers``).

    Raises:
        PartitionError: the cut does not fit the model (``check_partition``).
        ValueError: the parts' LoRA differ (or a part has none): a block would change its adapter's shape.
    """
    parts = split.parts()
    specs = {name: getattr(part, "lora_spec", None) for name, part in parts.items()}
    if None in specs.values() or len({repr(s) for s in specs.values()}) != 1:
        raise ValueError(
            f"cannot move the cut of a split whose parts' LoRA differ ({specs}): give every part one LoRA to move cuts"
        )
    moved = SplitModel(split.model, head_layers, tail_layers)
    adapter = getattr(split.head, "adapter_name", "default")
    for part in moved.parts().values():
        # The blocks' modules already hold the adapter (peft injected it into the shared modules):
        # the new views only need the attributes ``add_lora`` sets on a part.
        part.lora_spec = specs["head"]  # type: ignore[assignment]  # a plain attribute (nn.Module types its setattr)
        part.adapter_name = adapter  # type: ignore[assignment]  # a plain attribute
    return moved


def recut_participant(old: Participant, plan: RunPlan, me: Any, head_layers: int, tail_layers: int) -> Participant:
    """``old`` moved to the cut (``head_layers``, ``tail_layers``): its model re-split, its noise recalibrated
    at the new p, its trunk session closed and a new one opened at the new cut.

    Args:
        old: the connected participant (closed here, whatever happens next).
        plan: the run plan (noise target, LoRA, head regularizer, rounds).
        me: the client's ``ClientPlan`` (batch size: the noise's release count).

    Returns:
        The new participant (its ``log`` and ``tokenizer`` the old one's).
    """
    from fedsea.privacy.calibration import resolve_noise
    from fedsea.privacy.regularizers import make_head_regularizer

    c, fed = old.client, old.fed
    split = resplit(c.split, head_layers, tail_layers)
    releases = releases_per_token(plan.fed.rounds, plan.fed.local_steps, me.batch_size, len(fed.examples))
    noise = resolve_noise(dataclasses.replace(plan.noise, releases=releases), split.head, old.tokenizer)
    embedding = split.head.embed_tokens.weight.detach()  # (V, d) the public embedding
    regularizer = make_head_regularizer(plan.head_regularizer, plan.regularizer_weight, embedding, noise.noise)
    config = c.config
    old.close()  # the server allows a client a few sessions (max_sessions_per_client): free this one first
    client = SplitClient(
        config.address, split, noise=noise.noise, grad_noise=c.grad_noise, optim=c.optim, wire_dtype=c.wire_dtype,
        wire_compression=c.wire_compression, tls=config.tls, token=config.token, timeouts=config.timeouts,
        retries=config.retries, shaper=config.shaper, seed=c.seed, head_regularizer=regularizer,
        micro_batches=c.micro_batches,
    )  # fmt: skip
    client.connect()
    try:
        moved = FederatedClient(
            client, fed.examples, fed.batch_size, fed.name, on_step=fed.on_step, progress=fed.progress,
            on_round=fed.on_round, noise_secret=fed.noise_secret, seed=fed.seed,
        )  # fmt: skip
    except BaseException:
        client.close()
        raise
    return Participant(client, moved, noise, log=old.log, tokenizer=old.tokenizer)
