"""Training a bridge (``fedsea.training.bridge``) by distillation from the whole public model.

Made once per model and cut by whoever holds the whole public base model, on public text: the
model runs each window of text once (no gradient) and gives, at every position t, the head's
output h_p(t), the trunk's output h_{L-q}(t) and its own next-token choice (argmax). The bridge
is then fit, teacher-forced as in EAGLE (Li et al., 2024), to

    loss = mean over positions of ||g - h_{L-q}||^2 / ||h_{L-q}||^2  +  CE(tail(g), the model's choice)

with g = bridge(h_p(t), h_{L-q}(t - 1)): the first term keeps the guess a trunk output the
tail can read, the second is what drafting needs (the model's own token, not the text's, is
what verification keeps). The head and tail are the model's, frozen: only the bridge learns.
The cross-entropy runs the LM head on a random ``ce_fraction`` of the positions only (the LM
head's (d, V) product is most of a step's cost).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from fedsea.model.split import Tail
from fedsea.training.bridge import BRIDGE_LAYERS, Bridge

# Defaults of ``fedsea bridge train``, sized for SmolLM2-135M on a 2-core CPU (minutes).
BRIDGE_STEPS = 600
BRIDGE_BATCH = 4
BRIDGE_SEQ_LEN = 256
BRIDGE_LR = 1e-3
BRIDGE_CE_FRACTION = 0.25
BRIDGE_DRAFT_VOCAB = 8192


def token_windows(tokenizer: Any, texts: Iterable[str], seq_len: int) -> torch.Tensor:
    """(N, seq_len) int64: each text's last ``seq_len`` tokens (shorter texts are packed together).

    A text's end is kept: for a chat-formatted example that is the instruction and the answer,
    the part drafting has to guess.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    rows: list[list[int]] = []
    pending: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        if len(ids) >= seq_len:
            rows.append(ids[-seq_len:])
            continue
        pending += ids
        if len(pending) >= seq_len:
            rows.append(pending[-seq_len:])
            pending = []
    if not rows:
        raise ValueError(f"no text to train on (or less than {seq_len} tokens in all)")
    return torch.tensor(rows, dtype=torch.int64)


@torch.no_grad()
def _teacher(model: PreTrainedModel, bridge: Bridge, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The whole model on ``ids`` (B, n): h_p (B, n, d), h_{L-q} (B, n, d), its argmax (B, n)."""
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    states = out.hidden_states  # L + 1 of (B, n, d): the embeddings, then each block's output
    trunk_out = states[bridge.model_layers - bridge.tail_layers]
    return states[bridge.head_layers], trunk_out, out.logits.argmax(dim=-1)


def _student(bridge: Bridge, tail: Tail, h: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced guesses g (B, n, d) and the tail's last hidden states on them (B, n, d)."""
    batch, n, _ = h.shape
    prev = torch.cat([torch.zeros_like(f[:, :1]), f[:, :-1]], dim=1)  # (B, n, d): h_{L-q}(t - 1)
    positions = torch.arange(n, device=h.device).expand(batch, n)
    g = bridge(h, prev, positions)
    lengths = torch.full((batch,), n, dtype=torch.int64)
    return g, tail.norm(tail._run_blocks(g, lengths, None))


def _logits(tail: Tail, normed: torch.Tensor) -> torch.Tensor:
    return tail.cap_logits(tail.lm_head(normed))


@torch.no_grad()
def agreement(model: PreTrainedModel, bridge: Bridge, tail: Tail, windows: torch.Tensor, batch_size: int) -> float:
    """Teacher-forced top-1 agreement of the bridge drafter with the whole model, over ``windows``."""
    hits = total = 0
    bridge.eval()
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(model.device)
        h, f, target = _teacher(model, bridge, ids)
        _, normed = _student(bridge, tail, h, f)
        logits = _logits(tail, normed)  # (B, n, V)
        if bridge.draft_vocab is not None:  # what the drafter proposes: the best of its sub-vocabulary
            guess = bridge.draft_vocab.to(logits.device)[logits[..., bridge.draft_vocab].argmax(dim=-1)]
        else:
            guess = logits.argmax(dim=-1)
        hits += int((guess == target).sum())
        total += target.numel()
    return hits / max(total, 1)


def train_bridge(
    model: PreTrainedModel,
    head_layers: int,
    tail_layers: int,
    windows: torch.Tensor,
    eval_windows: torch.Tensor | None = None,
    steps: int = BRIDGE_STEPS,
    batch_size: int = BRIDGE_BATCH,
    lr: float = BRIDGE_LR,
    num_layers: int = BRIDGE_LAYERS,
    ce_fraction: float = BRIDGE_CE_FRACTION,
    draft_vocab: int | None = BRIDGE_DRAFT_VOCAB,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Bridge, dict[str, Any]]:
    """Fit a bridge for the cut (``head_layers``, ``tail_layers``) on ``windows`` (N, n) of token ids.

    Args:
        eval_windows: held-out windows: the teacher-forced agreement with the model is measured
            on them before and after (the share of positions where the drafter's token is the
            model's; roughly a draft token's chance of being kept).
        steps, batch_size, lr: AdamW with a linear warm-up (5% of the steps) and cosine decay.
        ce_fraction: share of positions whose cross-entropy is computed each step (> 0).
        draft_vocab: the drafts' sub-vocabulary: the ``draft_vocab`` tokens the model chose most
            often on the training text (None: the whole vocabulary). Drafting then multiplies by
            that many rows of the LM head, not all of them (the idea of FR-Spec, Zhao et al.
            2025): on a CPU the LM head is most of a draft token's cost. Verification is unchanged,
            so the output is too; a token outside it is only never drafted.

    Returns:
        The trained bridge (eval mode) and its figures: losses, agreement before and after.
    """
    if not 0.0 < ce_fraction <= 1.0:
        raise ValueError(f"ce_fraction must be in (0, 1], got {ce_fraction}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    torch.manual_seed(seed)
    order = random.Random(seed)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    tail = Tail(model, tail_layers)
    bridge = Bridge.from_model(model, head_layers, tail_layers, num_layers)
    info: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "seq_len": int(windows.shape[1]), "lr": lr}
    if eval_windows is not None:
        info["agreement_before"] = agreement(model, bridge, tail, eval_windows, batch_size)
    optimizer = torch.optim.AdamW(bridge.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # The whole model runs once per window, not once per step: its outputs are kept (2 n d
    # floats and n ids a window) and every epoch reuses them. Kept in three tensors allocated
    # up front: thousands of small tensors kept between the teacher's large transient ones
    # fragment the heap (the CLI's raised malloc thresholds kept 21 GB for 556 windows).
    count, n = windows.shape
    param = next(model.parameters())
    shape = (count, n, int(model.config.hidden_size))
    all_h = torch.empty(shape, dtype=param.dtype, device=param.device)  # (N, n, d) h_p
    all_f = torch.empty(shape, dtype=param.dtype, device=param.device)  # (N, n, d) h_{L-q}
    all_t = torch.empty((count, n), dtype=torch.int64, device=param.device)  # (N, n) the model's argmax
    for i in tqdm(range(0, count, batch_size), desc="teacher", disable=not progress, unit="batch"):
        h, f, target = _teacher(model, bridge, windows[i : i + batch_size].to(model.device))
        all_h[i : i + batch_size], all_f[i : i + batch_size], all_t[i : i + batch_size] = h, f, target
        del h, f, target
    if draft_vocab is not None:
        if draft_vocab < 1:
            raise ValueError(f"draft_vocab must be >= 1 (or None: the whole vocabulary), got {draft_vocab}")
        counts = torch.bincount(all_t.flatten().cpu(), minlength=tail.lm_head.out_features)
        chosen = counts.topk(min(draft_vocab, int((counts > 0).sum()))).indices
        bridge.draft_vocab = chosen.sort().values.to(model.device)
        info["draft_vocab"] = int(chosen.numel())
    indices: list[int] = []
    bar = tqdm(range(steps), desc="bridge", disable=not progress, unit="step")
    losses: list[float] = []
    bridge.train()
    for _ in bar:
        if len(indices) < batch_size:
            indices += order.sample(range(count), count)
        batch, indices = indices[:batch_size], indices[batch_size:]
        rows = torch.tensor(batch, device=param.device)
        h, f, target = all_h[rows], all_f[rows], all_t[rows]  # (B, n, d), (B, n, d), (B, n)
        g, normed = _student(bridge, tail, h, f)
        # Relative squared error per position: a few positions (the first, delimiters) carry
        # activations hundreds of times larger than the rest and would otherwise be all it fits.
        regression = ((g - f).pow(2).sum(-1) / f.pow(2).sum(-1).clamp_min(1e-6)).mean()
        flat = normed.reshape(-1, normed.shape[-1])  # (B n, d)
        pick = torch.randperm(flat.shape[0], device=flat.device)[: max(1, int(flat.shape[0] * ce_fraction))]
        ce = F.cross_entropy(_logits(tail, flat[pick]).float(), target.reshape(-1)[pick])
        loss = regression + ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bridge.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", ce=f"{float(ce.detach()):.3f}", reg=f"{float(regression):.3f}")
    bridge.eval()
    info["loss_first"], info["loss_last"] = losses[0], sum(losses[-10:]) / len(losses[-10:])
    if eval_windows is not None:
        info["agreement_after"] = agreement(model, bridge, tail, eval_windows, batch_size)
    return bridge, info
