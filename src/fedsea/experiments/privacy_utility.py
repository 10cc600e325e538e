"""The attack grid's two training callbacks: task quality under a defence, and the victim's own head.

``run_attack_grid`` measures what an attacker recovers; whether a setting is worth using
also depends on what it costs the task. Both callbacks here train fresh LoRA adapters on a
*copy* of the public model, through the client's real split step (``SplitTrainer`` with a
``LocalTrunk``), so that adapters never leak between settings nor into the attacker's
public head:

- ``finetune_utility``: for (defence, p, sigma), fine-tune with the defence's mechanism at
  the cut (and its head regularizer), then evaluate the task *through the split with the
  same noise at the cut*: the deployed setting, where inference pays the noise too.
- ``finetuned_victim_head``: for (defence, p), the victim's head with its private adapter
  fine-tuned on the task data (not the attacker's auxiliary text), with the defence's
  regularizer for ``nopeek`` / ``adversarial``. One head serves every sigma of the grid, so
  it is trained without noise at the cut (clipping, if set, applies).

Evaluation reuses ``fedsea.tasks.evaluate`` unchanged: it takes any ``Runner``, and a
``SplitRunner`` whose cut releases through the setting's ``Privatizer`` scores classification
and generation alike (the generation loop noises the prompt once and each new token once, as a
deployed client does).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedsea.config import LoraSpec, NoiseConfig, OptimConfig
from fedsea.experiments.attack_grid import HEAD_DEFENCES, GridConfig, VictimHeadFn, _mechanism
from fedsea.model.adapters import adapter_state_dict, load_adapter_state_dict
from fedsea.model.seeding import seeded
from fedsea.model.split import Head, SplitModel, split_model
from fedsea.privacy.attacks import HiddenSet, encode_texts, head_states
from fedsea.privacy.noise import Privatizer
from fedsea.privacy.regularizers import HeadRegularizer, make_head_regularizer
from fedsea.privacy.shaped import ShapedPrivatizer
from fedsea.tasks.evaluate import evaluate
from fedsea.tasks.finetune import FinetuneConfig, training_batches
from fedsea.tasks.prompts import encode_for_training
from fedsea.tasks.registry import get_task
from fedsea.tasks.runners import SplitRunner
from fedsea.training import LocalTrunk, SplitTrainer, make_batch

Key = tuple[str, int, float]


@dataclass(frozen=True)
class UtilityConfig:
    """How each setting is fine-tuned and scored.

    Args:
        task (`str`, defaults to "sst2"): a registered ``fedsea.tasks`` task.
        finetune (`FinetuneConfig`): steps, batch size, learning rate, longest sequence and
            the seed of the data order (defaults: 24 steps x 4 sequences at lr 1e-3).
        eval_limit (`int`, defaults to 200): evaluate on the first N rows of the eval split.
        regularizer_weight (`float`, defaults to 1.0): weight of the ``nopeek`` /
            ``adversarial`` head regularizer.
        lora (`LoraSpec`): the adapters added to head, trunk and tail.
        source, data_dir: where the task's rows come from (``Task.load``).
    """

    task: str = "sst2"
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(steps=24, batch_size=4, lr=1e-3))
    eval_limit: int = 200
    regularizer_weight: float = 1.0
    lora: LoraSpec = field(default_factory=LoraSpec)
    source: str | None = None
    data_dir: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        get_task(self.task)  # an unknown task fails here, before any model is copied
        if not isinstance(self.eval_limit, int) or self.eval_limit < 1:
            raise ValueError(f"eval_limit must be an integer >= 1, got {self.eval_limit!r}")
        if not (math.isfinite(self.regularizer_weight) and self.regularizer_weight >= 0):
            raise ValueError(f"regularizer_weight must be a finite number >= 0, got {self.regularizer_weight!r}")


@dataclass
class Finetuned:
    """One fine-tuning run: its losses and the trained adapters (part -> LoRA tensors)."""

    losses: list[float]
    adapters: dict[str, dict[str, torch.Tensor]]
    seconds: float


class SplitFinetuner:
    """Fine-tunes fresh adapters on copies of the public model through the split step.

    Args:
        model: the public base model; never modified (each run works on a deep copy).
        tokenizer: its tokenizer.
        grid: the grid (tail layers, clip norm, shaped-noise settings, seed).
        aux_texts: the public auxiliary text, the same as the attacker's: shaped noise's
            token subspace is measured on it, exactly as the grid does.
        config: task, budget and scoring.
        log: progress lines.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        grid: GridConfig,
        aux_texts: Sequence[str],
        config: UtilityConfig | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.grid = model, tokenizer, grid
        self.aux_texts = list(aux_texts)
        self.config = config or UtilityConfig()
        self.say = log or (lambda _msg: None)
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self._train_set: list[tuple[list[int], int]] | None = None
        self._aux: dict[int, HiddenSet] = {}

    def train_set(self) -> list[tuple[list[int], int]]:
        """(ids, loss_from) of the train examples one run sees, those within ``max_seq_len`` (encoded once).

        A run takes ``steps x batch_size`` sequences: those are the first of a seeded shuffle
        of the train split, so that the rest (9.5k for SST-2, seconds of chat templating) is
        never encoded. Every setting trains on the same examples in the same order.
        """
        if self._train_set is None:
            cfg, budget = self.config, self.config.finetune
            examples, _ = get_task(cfg.task).examples("train", cfg.source, cfg.data_dir)
            examples = [ex for ex in examples if ex.label is not None or ex.references]
            order = np.random.default_rng(budget.seed).permutation(len(examples))[: budget.steps * budget.batch_size]
            encoded = [encode_for_training(self.tokenizer, examples[int(i)]) for i in order]
            self._train_set = [e for e in encoded if len(e[0]) <= budget.max_seq_len]
            if not self._train_set:
                raise ValueError(f"no {cfg.task} train example fits max_seq_len={budget.max_seq_len}")
        return self._train_set

    def mechanism(self, defence: str, p: int, sigma: float) -> Privatizer:
        """The victim's release mechanism of the grid at (defence, p, sigma), on the model's device."""
        noise = NoiseConfig(sigma=sigma, clip_norm=self.grid.clip_norm, seed=self.grid.seed + 1)
        device = self.model.device
        if defence != "shaped":
            return Privatizer(noise, device=device)
        if p not in self._aux:  # the grid's own measurement: the public head on the auxiliary text
            ids = encode_texts(self.tokenizer, self.aux_texts, self.grid.max_tokens)
            self._aux[p] = head_states(split_model(self.model, p, self.grid.tail_layers).head, ids, self.pad)
        shaped = _mechanism(defence, sigma, self.grid, self.grid.seed + 1, self._aux[p])
        assert isinstance(shaped, ShapedPrivatizer)
        return ShapedPrivatizer(noise, shaped.shape, device=device)

    def regularizer(self, defence: str, split: SplitModel, sigma: float) -> HeadRegularizer | None:
        """The head regularizer of a head defence (``None`` for the others)."""
        if defence not in HEAD_DEFENCES:
            return None
        embedding = split.head.embed_tokens.weight.detach()  # (V, d) the public embedding
        noise = NoiseConfig(sigma=sigma, clip_norm=self.grid.clip_norm, seed=self.grid.seed + 3)
        return make_head_regularizer(defence, self.config.regularizer_weight, embedding, noise, self.grid.seed + 3)

    def fresh_split(self, p: int) -> SplitModel:
        """A deep copy of the public model, split at (p, q), with new (seeded) adapters."""
        split = split_model(copy.deepcopy(self.model), p, self.grid.tail_layers)
        with seeded(self.config.finetune.seed):
            return split.add_lora(self.config.lora)

    def train(self, defence: str, p: int, sigma: float) -> tuple[SplitModel, Finetuned]:
        """Fine-tune a fresh split at (p, q) with the defence's mechanism at ``sigma`` and its regularizer."""
        cfg = self.config.finetune
        split = self.fresh_split(p)
        optim = OptimConfig(lr=cfg.lr)
        trainer = SplitTrainer(
            split,
            LocalTrunk(split.trunk, optim),
            optim=optim,
            privatizer=self.mechanism(defence, p, sigma),
            head_regularizer=self.regularizer(defence, split, sigma),
        )
        usable = self.train_set()
        batches = training_batches([len(ids) for ids, _ in usable], cfg.batch_size, cfg.seed)
        losses: list[float] = []
        start = time.monotonic()
        with seeded(cfg.seed):  # LoRA dropout draws from the global RNG
            for _ in range(cfg.steps):
                chosen = [usable[i] for i in next(batches)]
                batch = make_batch([ids for ids, _ in chosen], self.pad, loss_from=[s for _, s in chosen])
                losses.append(trainer.train_step(batch.to(split.model.device)).loss)
        split.model.eval()
        adapters = {name: adapter_state_dict(part) for name, part in split.parts().items()}
        return split, Finetuned(losses, adapters, time.monotonic() - start)

    def restore(self, p: int, run: Finetuned) -> SplitModel:
        """A fresh copy of the public model with ``run``'s trained adapters (e.g. to evaluate it unsplit)."""
        split = self.fresh_split(p)
        for name, part in split.parts().items():
            load_adapter_state_dict(part, run.adapters[name])
        return split


class FinetuneUtility:
    """``UtilityFn``: (defence, p, sigma) -> the task's primary metric after fine-tuning there.

    Results are cached per (defence, p, sigma): the grid asks once per setting, a caller may
    ask again for free. ``runs`` keeps each setting's losses and adapters (LoRA tensors only,
    small; ``tuner.restore`` rebuilds the model), ``trainings`` counts the runs done.
    """

    def __init__(self, tuner: SplitFinetuner) -> None:
        self.tuner = tuner
        self.results: dict[Key, float] = {}
        self.runs: dict[Key, Finetuned] = {}
        self.trainings = 0

    @property
    def name(self) -> str:
        """The utility's label in the table and the plot."""
        task = get_task(self.tuner.config.task)
        steps = self.tuner.config.finetune.steps
        return f"{task.name} {task.primary_metric} (fine-tuned {steps} steps, noised cut)"

    def __call__(self, defence: str, p: int, sigma: float) -> float:
        """Task quality after noise-aware fine-tuning with this (defence, p, sigma); cached per setting."""
        key = (defence, int(p), float(sigma))
        if key in self.results:
            return self.results[key]
        split, run = self.tuner.train(defence, p, sigma)
        self.trainings += 1
        cfg = self.tuner.config
        runner = SplitRunner(split, privatize=self.tuner.mechanism(defence, p, sigma))
        result = evaluate(
            cfg.task,
            runner,
            self.tokenizer,
            limit=cfg.eval_limit,
            source=cfg.source,
            data_dir=cfg.data_dir,
            progress=False,
        )
        value = result.metrics[result.primary_metric]
        self.results[key], self.runs[key] = value, run
        self.tuner.say(
            f"  fine-tuned {cfg.task} ({defence}, p={p}, sigma={sigma:.3g}): loss {run.losses[0]:.3f} -> "
            f"{run.losses[-1]:.3f}, {result.primary_metric}={value:.4g} on {result.num_examples} examples "
            f"({run.seconds:.0f}s training)"
        )
        return value

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer the fine-tuning and the evaluation use."""
        return self.tuner.tokenizer

    def victim_head(self, defence: str, p: int, sigma: float) -> Head:
        """``VictimHeadFn``: the head this setting's fine-tuning trained (under its noise), on a fresh
        model copy: the head that is deployed, and so the one whose releases an attacker sees."""
        self(defence, p, sigma)
        return self.tuner.restore(p, self.runs[(defence, int(p), float(sigma))]).head


def finetune_utility(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    grid: GridConfig,
    aux_texts: Sequence[str],
    config: UtilityConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> FinetuneUtility:
    """A cached ``UtilityFn`` for ``run_attack_grid``: task quality after fine-tuning under each setting.

    Args:
        model: the public base model (copied per setting, never modified).
        tokenizer: its tokenizer.
        grid: the grid the utility is for (q, clip norm, shaped-noise settings, seed).
        aux_texts: the attacker's public auxiliary text (shaped noise is measured on it).
        config: task, fine-tuning budget, evaluation size, regularizer weight.
        log: progress lines.
    """
    return FinetuneUtility(SplitFinetuner(model, tokenizer, grid, aux_texts, config, log))


def finetuned_victim_head(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    grid: GridConfig,
    aux_texts: Sequence[str],
    config: UtilityConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> VictimHeadFn:
    """A ``VictimHeadFn``: (defence, p) -> the victim's head, its private adapter fine-tuned on the task.

    Each (defence, p) trains once, on a fresh copy of ``model`` (without noise at the cut; the
    defence's regularizer for ``nopeek`` / ``adversarial``), and serves every sigma. The attacker
    keeps the public base head unless the grid says it knows this one.
    """
    tuner = SplitFinetuner(model, tokenizer, grid, aux_texts, config, log)
    heads: dict[tuple[str, int], Head] = {}

    def victim_head(defence: str, p: int, sigma: float = 0.0) -> Head:
        if (defence, p) in heads:
            return heads[(defence, p)]
        split, run = tuner.train(defence, p, 0.0)
        regularized = "with" if defence in HEAD_DEFENCES else "without"
        tuner.say(
            f"  victim head ({defence}, p={p}): {tuner.config.task} adapter {regularized} regularizer, "
            f"loss {run.losses[0]:.3f} -> {run.losses[-1]:.3f} ({run.seconds:.0f}s)"
        )
        heads[(defence, p)] = split.head
        return split.head

    return victim_head


__all__ = [
    "FinetuneUtility",
    "Finetuned",
    "SplitFinetuner",
    "UtilityConfig",
    "finetune_utility",
    "finetuned_victim_head",
]
