"""The three-way split: head, trunk and tail as views over one Hugging Face model.

``split_model(model, head_layers=p, tail_layers=q)`` cuts a decoder-only causal LM of L
blocks (a family of ``fedsea.model.families``: LLaMA, Qwen 2/3, Mistral, Gemma 2/3, Phi-3) into

    head  = token embedding + blocks [0, p)          (client)
    trunk = blocks [p, L - q)                          (server)
    tail  = blocks [L - q, L) + final norm + LM head   (client)

Design decisions:
- The parts are *views*: they hold the model's own modules (no copies), so the unsplit
  model and its three parts always agree, and LoRA injected into a part is seen by both.
- Blocks are kept in a ``ModuleDict`` keyed by their global index, so parameter names
  (``layers.12.self_attn.q_proj...``) do not depend on p and q: an adapter saved with one
  partition can be loaded after the partition moves.
- Only hidden states and one length per sequence pass between parts; each part rebuilds
  its masks and rotary positions from the lengths (``fedsea.model.masks``).
- Tied embeddings (SmolLM2) stay on the client: the head holds the embedding, the tail
  the LM head, both sharing one matrix.
- What a family's forward does between the parts (per-layer masks and rotary embeddings, the
  final logit soft-cap) comes from its ``Family`` record, not from if-chains here.
- An unpadded batch gives transformers' mask builders no 2-D mask, so SDPA takes the same
  (``is_causal`` / no-mask) path as Hugging Face ``generate`` on such a batch, without the
  host sync of checking an all-ones mask on the accelerator.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from fedsea.config import LoraSpec, SplitLora
from fedsea.errors import InvalidInputError, PartitionError
from fedsea.model import adapters
from fedsea.model.attention import attention_kernels
from fedsea.model.attention_switch import ordinary_forward
from fedsea.model.families import FAMILIES, SLIDING_ATTENTION, Family, family_of, layer_types
from fedsea.model.masks import check_finite, check_lengths, padding_mask, position_ids
from fedsea.model.model_card import TrainingRecord

if TYPE_CHECKING:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

# model_type -> the causal-LM class name fedsea knows how to split.
SUPPORTED_ARCHITECTURES: dict[str, str] = {f.model_type: f.architecture for f in FAMILIES.values()}

PART_NAMES: tuple[str, ...] = ("head", "trunk", "tail")


def check_supported(model: nn.Module) -> None:
    """Raise ``UnsupportedModelError`` unless ``model`` is a causal LM fedsea can split."""
    family_of(model)


def check_partition(num_layers: int, head_layers: int, tail_layers: int) -> None:
    """Raise ``PartitionError`` unless p >= 1, q >= 1 and p + q < L."""
    for name, value in (("head_layers", head_layers), ("tail_layers", tail_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PartitionError(f"{name} must be an integer >= 1, got {value!r}")
    if head_layers + tail_layers >= num_layers:
        raise PartitionError(
            f"head_layers + tail_layers must be < the model's {num_layers} blocks so that the trunk keeps "
            f"at least one, got {head_layers} + {tail_layers} = {head_layers + tail_layers}"
        )


def partition_range(num_layers: int) -> dict[str, list[int] | str]:
    """The valid (p, q) of an L-block model: p in [1, L-2], q in [1, L-1-p] (``fedsea info``)."""
    return {"head_layers": [1, num_layers - 2], "tail_layers": f"[1, {num_layers - 1} - head_layers]"}


def no_padding(lengths: torch.Tensor, total: int) -> bool:
    """True when every row is ``total`` real tokens long, decided without a device sync.

    ``lengths`` on the CPU (the usual case: they come from the tokenizer or the wire) is read
    for free; on an accelerator reading it would stall the stream, so the answer is False and
    the explicit (all-ones) mask is kept.
    """
    return lengths.device.type == "cpu" and bool((lengths == total).all())


class SplitPart(nn.Module):
    """Blocks [start, end) of a model, runnable alone on hidden states and lengths."""

    part_name: str = "part"

    def __init__(self, model: PreTrainedModel, start: int, end: int) -> None:
        super().__init__()
        self.config = model.config
        self.family: Family = family_of(model)
        self.start, self.end = start, end
        base = model.model
        self.layers = nn.ModuleDict({str(i): base.layers[i] for i in range(start, end)})
        kinds = layer_types(self.config)
        self.layer_types: dict[str, str] = {str(i): kinds[i] for i in range(start, end)}
        # Rotary embedding has no trainable weights (inv_freq buffer only): shared, not copied.
        self.rotary_emb = base.rotary_emb

    @property
    def hidden_size(self) -> int:
        """d, the model's hidden width (the last dimension of the states this part takes)."""
        return int(self.config.hidden_size)

    def new_cache(self) -> DynamicCache:
        """A KV cache for this part's blocks (indexed by global layer number).

        Sliding-window layers keep their whole past (``record_past``) so that a rewind can cut
        them like full layers; attention still sees only the window (the layer returns the
        last ``sliding_window - 1 + n`` slots and the mask matches).
        """
        cache = DynamicCache(config=self.config)
        for layer in cache.layers:
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.activate_past_recording()
        return cache

    def _check_hidden(self, hidden: torch.Tensor, *, finite: bool = True) -> None:
        if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
            raise InvalidInputError("hidden", "expected a floating-point tensor")
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise InvalidInputError(
                "hidden", f"expected shape (batch, tokens, {self.hidden_size}), got {tuple(hidden.shape)}"
            )
        if hidden.shape[1] == 0:
            raise InvalidInputError("hidden", "expected at least one token")
        if finite:
            check_finite(hidden, "hidden")

    def _masks(
        self, hidden: torch.Tensor, attn_2d: torch.Tensor | None, cache: DynamicCache | None
    ) -> dict[str, torch.Tensor | None]:
        """One 4-D mask (or None: SDPA's is_causal path) per attention kind among this part's blocks."""
        masks: dict[str, torch.Tensor | None] = {}
        for key, kind in self.layer_types.items():
            if kind in masks:
                continue
            build = create_sliding_window_causal_mask if kind == SLIDING_ATTENTION else create_causal_mask
            masks[kind] = build(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attn_2d,
                cache=cache,
                # Positions only serve packed-sequence detection, which needs no 2-D mask and no cache;
                # ours are never packed, and the detection would sync with the device.
                position_ids=None,
                # The cache may hold only this part's layers: size the mask on one of this kind here.
                layer_idx=int(key),
            )
        return masks

    def _run_blocks(self, hidden: torch.Tensor, lengths: torch.Tensor, cache: DynamicCache | None) -> torch.Tensor:
        """Run this part's blocks on ``hidden`` (B, n, d); ``lengths`` counts cached past too."""
        # Another thread's joint pass may have the shared config's attention switched: wait for it.
        with ordinary_forward(self.config):
            return self._blocks(hidden, lengths, cache)

    def _blocks(self, hidden: torch.Tensor, lengths: torch.Tensor, cache: DynamicCache | None) -> torch.Tensor:
        batch, new = hidden.shape[0], hidden.shape[1]
        past = cache.get_seq_length(self.start) if cache is not None else 0
        total = past + new
        check_lengths(lengths, batch, total)
        unpadded = no_padding(lengths, total)
        # Built where the lengths are (the host, in practice) and copied over without blocking:
        # a blocking host-to-device copy would wait for the device's queue (a sync per part).
        lengths = lengths.to(torch.int64)
        attn_2d = None if unpadded else padding_mask(lengths, total).to(hidden.device, non_blocking=True)  # (B, T)
        pos = position_ids(lengths, total, new).to(hidden.device, non_blocking=True)  # (B, n)
        masks = self._masks(hidden, attn_2d, cache)
        # (cos, sin), each (B, n, head_dim): one pair, or one per layer type (Gemma 3's local/global rope).
        if self.family.rope_per_layer_type:
            ropes = {kind: self.rotary_emb(hidden, pos, kind) for kind in set(self.layer_types.values())}
        else:
            rope = self.rotary_emb(hidden, position_ids=pos)
            ropes = dict.fromkeys(self.layer_types.values(), rope)
        with attention_kernels(hidden.device):  # no per-shape kernel setup on a GPU (``fedsea.model.attention``)
            for key, layer in self.layers.items():
                kind = self.layer_types[key]
                hidden = layer(
                    hidden,
                    attention_mask=masks[kind],
                    position_ids=pos,
                    cache=cache,
                    use_cache=cache is not None,
                    position_embeddings=ropes[kind],
                )
        return hidden


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ``InvalidInputError`` unless every id is in [0, vocab_size): before ids go to an accelerator.

    An id out of range on a GPU is a device-side assert that kills the process; on the CPU it
    is this clear error. Reads the ids (a device sync if they are not on the CPU).
    """
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise InvalidInputError("input_ids", f"token ids must be in [0, {vocab_size})")


class Head(SplitPart):
    """Client part A: token embedding and blocks [0, p). ``head(input_ids, lengths) -> h_p``."""

    part_name = "head"

    def __init__(self, model: PreTrainedModel, head_layers: int) -> None:
        super().__init__(model, 0, head_layers)
        self.embed_tokens = model.model.embed_tokens

    def forward(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, cache: DynamicCache | None = None
    ) -> torch.Tensor:
        """Args: input_ids (B, n) int64, left-padded; lengths (B,). Returns h_p (B, n, d).

        Token ids are range-checked here on the CPU only (see ``check_token_ids``).
        """
        return self._run_blocks(self.embed(input_ids), lengths, cache)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The checked ids' token embeddings (B, n, d): what the head's first block reads."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
            raise InvalidInputError("input_ids", f"expected shape (batch, tokens) with tokens >= 1, got {shape}")
        if input_ids.dtype != torch.int64:
            raise InvalidInputError("input_ids", f"expected int64 token ids, got {input_ids.dtype}")
        # Checked where it is free (CPU). On an accelerator, reading them would sync the device at
        # every decode step: the callers that move ids there (trainers, SplitClient) check them
        # with ``check_token_ids`` before the move, and decode steps feed the model's own argmax.
        if input_ids.device.type == "cpu":
            check_token_ids(input_ids, self.embed_tokens.num_embeddings)
        # Gemma's embedding module multiplies by sqrt(d) itself: the head needs no scale of its own.
        hidden: torch.Tensor = self.embed_tokens(input_ids)  # (B, n, d)
        return hidden


class Trunk(SplitPart):
    """Server part B: blocks [p, L - q). ``trunk(h_p, lengths) -> h_{L-q}``."""

    part_name = "trunk"

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor, cache: DynamicCache | None = None) -> torch.Tensor:
        """hidden: (B, n, d) h_p, lengths: (B,) real tokens; returns h_{L-q} (B, n, d)."""
        # The server's input is untrusted: checked for NaN/Inf here when it is on the host. On an
        # accelerator the check would sync the device at every decode step, so the server checks
        # the wire's host tensor before moving it (``fedsea.server``), and a local caller owns its input.
        self._check_hidden(hidden, finite=hidden.device.type == "cpu")
        return self._run_blocks(hidden, lengths, cache)


class Tail(SplitPart):
    """Client part C: blocks [L - q, L), final norm and LM head. ``tail(h, lengths) -> logits``."""

    part_name = "tail"

    def __init__(self, model: PreTrainedModel, tail_layers: int) -> None:
        num_layers = model.config.num_hidden_layers
        super().__init__(model, num_layers - tail_layers, num_layers)
        self.norm = model.model.norm
        self.lm_head = model.lm_head

    def forward(
        self,
        hidden: torch.Tensor,
        lengths: torch.Tensor,
        cache: DynamicCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Returns logits (B, n, V), or (B, k, V) for the last ``logits_to_keep`` = k slots."""
        return self.cap_logits(self.lm_head(self.normed(hidden, lengths, cache, logits_to_keep)))  # (B, n|k, V)

    def normed(
        self, hidden: torch.Tensor, lengths: torch.Tensor, cache: DynamicCache | None = None, keep: int = 0
    ) -> torch.Tensor:
        """The final norm's output (B, n|keep, d): what the LM head reads (a drafter may read part of it)."""
        # The finiteness check costs a device sync: done on CPU tensors only (the tail's input
        # comes from the client's own trunk connection, already decoded and shape-checked).
        self._check_hidden(hidden, finite=hidden.device.type == "cpu")
        hidden = self._run_blocks(hidden, lengths, cache)
        if keep > 0:
            hidden = hidden[:, -keep:]
        normed: torch.Tensor = self.norm(hidden)
        return normed

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Gemma 2/3's soft cap, cap * tanh(logits / cap), as their ForCausalLM.forward; others unchanged."""
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap is not None else logits


class SplitModel:
    """One model seen as three parts. ``split(input_ids, lengths)`` composes them (no noise)."""

    def __init__(self, model: PreTrainedModel, head_layers: int, tail_layers: int) -> None:
        check_supported(model)
        check_partition(int(model.config.num_hidden_layers), head_layers, tail_layers)
        self.model = model
        self.head_layers, self.tail_layers = head_layers, tail_layers
        self.head = Head(model, head_layers)
        self.trunk = Trunk(model, head_layers, model.config.num_hidden_layers - tail_layers)
        self.tail = Tail(model, tail_layers)

    @property
    def num_layers(self) -> int:
        """L, the number of decoder blocks of the whole model."""
        return int(self.model.config.num_hidden_layers)

    def parts(self) -> dict[str, SplitPart]:
        """The three parts by name: ``head``, ``trunk``, ``tail``."""
        return {"head": self.head, "trunk": self.trunk, "tail": self.tail}

    def __call__(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Head, trunk and tail in turn on a left-padded batch; returns logits (B, n, V)."""
        logits: torch.Tensor = self.tail(self.trunk(self.head(input_ids, lengths), lengths), lengths)
        return logits

    def add_lora(self, lora: SplitLora | LoraSpec | None = None) -> SplitModel:
        """Add LoRA adapters (peft) to the parts; one ``LoraSpec`` for all, or a ``SplitLora``."""
        adapters.add_split_lora(self, lora if lora is not None else LoraSpec())
        return self

    def save_adapters(self, directory: str | os.PathLike[str]) -> Path:
        """Write each adapted part's adapter under ``directory/{head,trunk,tail}``, and all of them in
        peft's format under ``directory/peft`` (``PeftModel.from_pretrained(base, directory/peft)``); atomic."""
        return adapters.save_split_adapters(self, directory)

    def load_adapters(self, directory: str | os.PathLike[str]) -> SplitModel:
        """Load the adapters written by ``save_adapters`` (parts without a folder are left alone)."""
        found = False
        for name, part in self.parts().items():
            if (Path(directory) / name).is_dir():
                adapters.load_adapter(part, Path(directory) / name)
                found = True
        if not found:
            raise adapters.AdapterError(f"no head/, trunk/ or tail/ adapter folder in {directory}")
        return self

    def export(
        self,
        directory: str | os.PathLike[str],
        tokenizer: PreTrainedTokenizerBase | None = None,
        record: TrainingRecord | None = None,
    ) -> Path:
        """Merge all adapters into the base weights and write a plain Hugging Face checkpoint, with a
        model card from ``record`` (``fedsea.model.model_card``; default: the base model, cut and LoRA)."""
        return adapters.export_merged(self, directory, tokenizer, record)

    def __repr__(self) -> str:
        return (
            f"SplitModel({type(self.model).__name__}, L={self.num_layers}, "
            f"head=[0,{self.head.end}), trunk=[{self.trunk.start},{self.trunk.end}), "
            f"tail=[{self.tail.start},{self.num_layers}))"
        )


def split_model(model: PreTrainedModel, head_layers: int, tail_layers: int) -> SplitModel:
    """Split ``model`` into head (p blocks), trunk and tail (q blocks).

    Args:
        model: a supported Hugging Face causal LM (see ``SUPPORTED_ARCHITECTURES``).
        head_layers: p >= 1, blocks kept by the client before the trunk.
        tail_layers: q >= 1, blocks kept by the client after it; p + q < L.

    Raises:
        UnsupportedModelError: for an architecture fedsea cannot split.
        PartitionError: for partition points that do not fit the model.
    """
    return SplitModel(model, head_layers, tail_layers)


def central_forward(model: PreTrainedModel, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The unsplit model on a left-padded batch, with the same masks and positions as the split.

    Returns logits (B, n, V).
    """
    total = input_ids.shape[1]
    check_lengths(lengths, input_ids.shape[0], total)
    unpadded = no_padding(lengths, total)  # then no mask: the same SDPA path as the split's
    lengths = lengths.to(device=input_ids.device, dtype=torch.int64)
    # The split's attention kernels (``fedsea.model.attention``); never beside a joint pass that switched the config.
    with ordinary_forward(model.config), attention_kernels(input_ids.device):
        out = model(
            input_ids=input_ids,
            attention_mask=None if unpadded else padding_mask(lengths, total),
            position_ids=position_ids(lengths, total, total),
            use_cache=False,
        )
    logits: torch.Tensor = out.logits
    return logits
