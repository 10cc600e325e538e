"""``fedsea attack``: every attack against every (defence, p, sigma), as a table and a picture.

For each cut point p the attacker's training pairs are made once, with the public base
head on public auxiliary text. For each defence and sigma the victim's head output on
the victim text is released through the defence's mechanism (the victim's own seed), each
attack is fitted through the attacker's copy of the mechanism (another seed) and scored.

Utility comes from the caller (``utility``: task quality after fine-tuning with that
setting, e.g. from ``fedsea.training``); without one, the grid reports the base model's
perplexity on the victim text with the noise at the cut and no fine-tuning, the cheap
proxy of the issue's reference measurement.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedsea.config import NoiseConfig
from fedsea.experiments.constants import ATTACKER_HEADS as ATTACKER_HEADS
from fedsea.experiments.constants import ATTACKS as ATTACKS
from fedsea.experiments.constants import DEFENCES as DEFENCES
from fedsea.experiments.constants import HEAD_DEFENCES as HEAD_DEFENCES
from fedsea.experiments.privacy_report import GridRow, write_report
from fedsea.model.split import Head, SplitModel, split_model
from fedsea.privacy.accountant import epsilon_for_sigma
from fedsea.privacy.attacks import (
    Attack,
    DecoderAttack,
    HiddenSet,
    OptimizationAttack,
    OptimizationConfig,
    ProbeAttack,
    TrainConfig,
    encode_texts,
    head_states,
    release,
    score,
)
from fedsea.privacy.calibration import hidden_rms
from fedsea.privacy.noise import Privatizer
from fedsea.privacy.shaped import ShapedPrivatizer, subspace_shape, token_basis

# (defence, p, sigma) -> the victim's head with its private adapter trained under that defence
# (at that noise level, or the same head for every sigma).
VictimHeadFn = Callable[[str, int, float], Head]
# (defence, p, sigma) -> task quality after fine-tuning with that setting.
UtilityFn = Callable[[str, int, float], float]


@dataclass(frozen=True)
class GridConfig:
    """What the grid covers and how hard each attacker tries.

    Args:
        sigmas (`tuple[float, ...]`): noise levels; absolute std, or multiples of h_p's RMS
            per p when ``relative``.
        relative (`bool`, defaults to False): read ``sigmas`` as multiples of h_p's RMS
            (measured on the public auxiliary text at each p).
        head_layers (`tuple[int, ...]`, defaults to (1, 2, 4)): cut points p.
        tail_layers (`int`, defaults to 1): q (only the default utility uses the tail).
        defences (`tuple[str, ...]`): subset of ``DEFENCES``; ``"none"`` is the paper's noise.
        attacks (`tuple[str, ...]`): subset of ``ATTACKS``.
        clip_norm (`float | None`): per-token clip norm of every mechanism (gives epsilon).
        releases (`int`, defaults to 1): releases per token for epsilon.
        delta (`float`, defaults to 1e-5): delta for epsilon.
        max_tokens (`int`, defaults to 32): tokens kept per text.
        shaped_rank (`int`, defaults to 32): k of the token subspace of ``"shaped"``.
        shaped_fraction (`float`, defaults to 0.9): noise power inside that subspace.
        train (`TrainConfig`): training of the probe and the decoder.
        optimization (`OptimizationConfig`): the optimization attack from scratch.
        bisr (`OptimizationConfig`): the optimization attack started from the probe (no
            curriculum, top-64 tokens per slot by default: affordable with a 49k vocabulary).
        seed (`int`, defaults to 0): seeds of attackers (seed) and victims (seed + 1).
        attacker_heads (`tuple[str, ...]`, defaults to ("base",)): subset of ``ATTACKER_HEADS``;
            every attack runs once per attacker head (``"victim"`` needs ``victim_head``).
    """

    sigmas: tuple[float, ...] = (0.0, 1.0, 4.0, 16.0)
    relative: bool = False
    head_layers: tuple[int, ...] = (1, 2, 4)
    tail_layers: int = 1
    defences: tuple[str, ...] = ("none",)
    attacks: tuple[str, ...] = ("probe", "decoder", "bisr")
    clip_norm: float | None = None
    releases: int = 1
    delta: float = 1e-5
    max_tokens: int = 32
    shaped_rank: int = 32
    shaped_fraction: float = 0.9
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, width=512, batch_size=32))
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    bisr: OptimizationConfig = field(
        default_factory=lambda: OptimizationConfig(steps_per_token=0, final_steps=100, candidates=64)
    )
    seed: int = 0
    attacker_heads: tuple[str, ...] = ("base",)

    def __post_init__(self) -> None:
        for name, allowed in (("defences", DEFENCES), ("attacks", ATTACKS), ("attacker_heads", ATTACKER_HEADS)):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            bad = [v for v in values if v not in allowed]
            if not values or bad:
                raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {values!r}")
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        object.__setattr__(self, "head_layers", tuple(self.head_layers))
        if not self.sigmas or any(not (math.isfinite(s) and s >= 0) for s in self.sigmas):
            raise ValueError(f"sigmas must be non-empty, finite and >= 0, got {self.sigmas!r}")
        if not self.head_layers or any(not isinstance(p, int) or p < 1 for p in self.head_layers):
            raise ValueError(f"head_layers must be non-empty integers >= 1, got {self.head_layers!r}")
        if not 0 < self.shaped_fraction <= 1:
            raise ValueError(f"shaped_fraction must be in (0, 1], got {self.shaped_fraction!r}")
        if self.shaped_rank < 1 or self.max_tokens < 2:
            raise ValueError(f"shaped_rank must be >= 1 and max_tokens >= 2, got {self.shaped_rank}, {self.max_tokens}")
        if self.bisr.relax != "softmax":
            raise ValueError(
                f"bisr.relax must be 'softmax' (it starts from the probe's logits), got {self.bisr.relax!r}"
            )


def _mechanism(defence: str, sigma: float, config: GridConfig, seed: int, aux: HiddenSet) -> Privatizer:
    noise = NoiseConfig(sigma=sigma, clip_norm=config.clip_norm, seed=seed)
    if defence != "shaped":
        return Privatizer(noise)
    rank = min(config.shaped_rank, aux.hidden.shape[-1] - 1)
    shape = subspace_shape(token_basis(aux.hidden, aux.input_ids, aux.lengths, rank), config.shaped_fraction)
    return ShapedPrivatizer(noise, shape)


@torch.no_grad()
def noisy_perplexity(split: SplitModel, observed: torch.Tensor, victim: HiddenSet, batch_size: int = 16) -> float:
    """Perplexity of trunk + tail on the victim's released h~_p (next-token, real tokens only)."""
    total, count = 0.0, 0
    for idx in torch.arange(len(victim)).split(batch_size):
        device = split.model.device
        lengths = victim.lengths[idx].to(device)
        h = split.trunk(observed[idx].to(device=device, dtype=split.model.dtype), lengths)
        logits = split.tail(h, lengths).float().cpu()  # (b, n, V)
        target = victim.input_ids[idx][:, 1:]
        valid = victim.mask[idx][:, :-1] & victim.mask[idx][:, 1:]
        ce = F.cross_entropy(logits[:, :-1][valid], target[valid], reduction="sum")
        total, count = total + float(ce), count + int(valid.sum())
    return math.exp(total / max(count, 1))


def _attacks(names: Sequence[str], head: Head, config: GridConfig) -> list[Attack]:
    """The attacks in ``names`` order, except that ``probe`` runs first: ``bisr`` starts from it.

    ``head`` is the attacker's model of the victim's head (the optimization attacks run through it).
    """
    embedding = head.embed_tokens.weight.detach()
    probe = ProbeAttack(embedding, config.train)
    out: list[Attack] = [probe] if "probe" in names else []
    for name in names:
        if name == "decoder":
            out.append(DecoderAttack(embedding, config.train, max_len=max(config.max_tokens, 8)))
        elif name == "optimization":
            out.append(OptimizationAttack(head, config.optimization))
        elif name == "bisr":
            out.append(OptimizationAttack(head, config.bisr, prior=probe, fit_prior="probe" not in names))
    return out


def run_attack_grid(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    aux_texts: Sequence[str],
    victim_texts: Sequence[str],
    config: GridConfig,
    out_dir: str | Path | None = None,
    victim_head: VictimHeadFn | None = None,
    utility: UtilityFn | None = None,
    utility_name: str = "task quality",
    log: Callable[[str], None] | None = None,
) -> list[GridRow]:
    """Run every attack against every (defence, p, sigma); write the table and the plot.

    Args:
        model: the public base model (the attacker's; also the victim's unless ``victim_head``).
        tokenizer: its tokenizer.
        aux_texts: public auxiliary text the attacker trains on.
        victim_texts: the victim's text (another source).
        config: the grid.
        out_dir: where to write ``attack_grid.{csv,md,json}`` and ``privacy_utility.png``.
        victim_head: the victim's head per (defence, p, sigma), with its private adapter (used for
            every defence when given; else the public base head); required for ``nopeek`` and
            ``adversarial``, whose heads are trained by the caller with the regularizer.
        utility: task quality per (defence, p, sigma); default: base-model perplexity under noise.
        utility_name: label of ``utility`` in the table and the plot.
        log: progress lines (e.g. ``print``).
    """
    if victim_head is None and any(d in HEAD_DEFENCES for d in config.defences):
        raise ValueError(f"defences {HEAD_DEFENCES} need victim_head: a head trained with that regularizer")
    if victim_head is None and "victim" in config.attacker_heads:
        raise ValueError("attacker_heads 'victim' needs victim_head: the head whose adapter the attacker knows")
    say = log or (lambda _msg: None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    aux_ids = encode_texts(tokenizer, aux_texts, config.max_tokens)
    victim_ids = encode_texts(tokenizer, victim_texts, config.max_tokens)
    if not aux_ids or not victim_ids:
        raise ValueError("aux_texts and victim_texts must each give at least one sequence of >= 2 tokens")
    name = utility_name if utility is not None else "perplexity (base model, noised cut, no fine-tuning)"
    rows: list[GridRow] = []
    for p in config.head_layers:
        split = split_model(model, p, config.tail_layers)
        aux = head_states(split.head, aux_ids, pad)
        rms = hidden_rms(aux.hidden, aux.lengths, config.clip_norm)
        say(f"p={p}: {aux.num_tokens} attacker tokens, {len(victim_ids)} victim texts, rms(h_p)={rms:.3g}")
        for defence in config.defences:
            for s in config.sigmas:
                sigma = s * rms if config.relative else s
                # A given victim head serves every defence: its private adapter is what it is,
                # with or without a regularizer (and trained at this sigma, or at none).
                head = victim_head(defence, p, sigma) if victim_head is not None else split.head
                victim = head_states(head, victim_ids, pad)
                attacker_mech = _mechanism(defence, sigma, config, config.seed, aux)
                victim_mech = _mechanism(defence, sigma, config, config.seed + 1, aux)
                observed = release(victim, victim_mech)
                quality = utility(defence, p, sigma) if utility else noisy_perplexity(split, observed, victim)
                epsilon = None
                if config.clip_norm is not None:
                    worst = victim_mech.min_std if isinstance(victim_mech, ShapedPrivatizer) else sigma
                    epsilon = epsilon_for_sigma(worst, config.clip_norm, config.releases, config.delta)
                for attacker_head in config.attacker_heads:
                    # "victim": the attacker knows the victim's head adapter (as a FedAvg server
                    # does) and makes its training pairs on public text with that very head.
                    known = head if attacker_head == "victim" else split.head
                    pairs = head_states(known, aux_ids, pad) if attacker_head == "victim" else aux
                    for attack in _attacks(config.attacks, known, config):
                        start = time.monotonic()
                        attack.fit(pairs, attacker_mech)
                        scores = score(attack.predict(observed, victim.lengths), victim, tokenizer)
                        row = GridRow(
                            defence=defence,
                            head_layers=p,
                            sigma=sigma,
                            relative_sigma=sigma / max(rms, 1e-30),
                            clip_norm=config.clip_norm,
                            epsilon=epsilon,
                            attack=attack.name,
                            token_accuracy=scores.token_accuracy,
                            rouge_l=scores.rouge_l,
                            exact=scores.exact,
                            utility=quality,
                            utility_name=name,
                            seconds=time.monotonic() - start,
                            attacker_head=attacker_head,
                        )
                        rows.append(row)
                        say(
                            f"  {defence} p={p} sigma={sigma:.3g} {attack.name} ({attacker_head} head): "
                            f"acc={row.token_accuracy:.3f} rougeL={row.rouge_l:.3f} exact={row.exact:.2f} "
                            f"{name}={quality:.4g} ({row.seconds:.0f}s)"
                        )
    if out_dir is not None:
        write_report(rows, Path(out_dir))
    return rows
