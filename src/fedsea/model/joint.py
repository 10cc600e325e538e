"""One trunk pass over several inference streams, each with its own KV cache and LoRA adapter.

A multi-tenant trunk server (``fedsea.server.multitenant``) runs the decode steps (and
prefills) of concurrent generations in one pass over the shared blocks, as multi-LoRA servers
such as S-LoRA and Punica do. ``joint_forward(trunk, inputs)`` returns, for every stream, what
``trunk(hidden, lengths, cache=cache)`` with that stream's adapter active would have returned
(within float rounding: the projections run on more rows at once), and leaves each stream's
cache as that call would have.

Design decisions:
- **Token rows.** The streams' tokens are laid out one per batch row: stream s's (B_s, n_s, d)
  becomes rows [o_s, o_s + B_s * n_s) of one (N, 1, d) tensor, N = sum of B_s * n_s. Every
  part of a decoder block except attention works token by token (norms, projections, MLP,
  rotary embedding), so those run once on all N rows; a prefill of 100 tokens and a decode
  step of one token share a pass without padding either to the other's length.
- **Attention per stream, on the stream's own cache.** No padded copy of the caches is made:
  the pass hands each layer a cache object (``_JointCache``) whose ``update`` appends each
  stream's new keys and values to that stream's own ``DynamicCache`` and returns them as a
  list; the attention function of the pass (registered with transformers'
  ``AttentionInterface`` as ``fedsea_joint`` and made the config's for the pass only) runs the
  model's own attention implementation (sdpa, eager, flash) once per stream, on the stream's
  query (B_s, H, n_s, D), keys and values and the 4-D mask ``create_causal_mask`` built for the
  stream alone. Attention is the only place where tokens meet, so each stream sees exactly
  what it would see alone; memory beyond the streams' caches is the pass's activations only.
- **A batched LoRA of our own, per row.** peft's mixed-adapter batches (``adapter_names=``,
  ``lora.Linear._mixed_batch_forward``) take one adapter name per batch row and build, in
  every LoRA layer, a Python index list per adapter over all rows, then gather, run two small
  matmuls and scatter per adapter: with token rows that is O(N) Python work and ~8 small ops
  per adapter per layer (13k ops per pass for 16 SmolLM2 sessions, 40% of its CPU time; on a
  GPU, as many kernel launches). Here the LoRA layers compute only their base layer for the
  pass (peft's ``disable_adapters`` flag) and a forward hook adds every stream's adapter at
  once, Punica-style: x (N, in) times the pass's adapters' A matrices stacked (R = sum of
  ranks, in), each row's columns outside its own adapter's zeroed (and its scaling applied)
  by a (N, R) mask, times the B matrices stacked (out, R): two matmuls per layer whatever the
  number of adapters, ranks and targets may differ. A layer with one adapter in the pass
  runs peft's own operations on that stream's rows.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from fedsea.errors import InvalidInputError
from fedsea.model.attention import attention_kernels
from fedsea.model.attention_switch import ordinary_forward, switched_attention
from fedsea.model.masks import check_lengths, padding_mask, position_ids
from fedsea.model.split import SplitPart, no_padding

JOINT_ATTENTION = "fedsea_joint"


@dataclass
class JointInput:
    """One stream's share of a joint pass.

    Args:
        hidden: (B, n, d) the stream's new hidden states (n = 1 for a decode step).
        lengths: (B,) real tokens of each row, cached past included (as ``Trunk.forward`` takes them).
        cache: the stream's KV cache (``Trunk.new_cache``), updated in place; None: no cache (a naive step).
        adapter: the peft adapter name of the stream's LoRA; None: the base weights alone.
    """

    hidden: torch.Tensor
    lengths: torch.Tensor
    cache: DynamicCache | None
    adapter: str | None


@dataclass
class _Plan:
    """What the layers' attention and LoRA hooks need to find each stream's rows."""

    segments: list[tuple[int, int, int, int]]  # (first row, end row, B, n) of each stream
    masks: list[dict[str, torch.Tensor | None]]  # each stream's 4-D mask (or None) per attention kind
    positions: list[torch.Tensor]  # each stream's (B, n) position ids
    caches: list[DynamicCache | None]
    inner: str | None  # the model's own attention implementation (config name before the pass)


class _JointMask:
    """What a layer receives as its attention mask in a joint pass: the plan and its attention kind."""

    def __init__(self, plan: _Plan, kind: str) -> None:
        self.plan, self.kind = plan, kind


class _StreamTensors:
    """Per-stream keys (or values) of one layer, (B_s, kv_heads, T_s, D) each: ``_JointCache.update``'s answer."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors


def _stream_view(rows: torch.Tensor, batch: int, new: int) -> torch.Tensor:
    """(B*n, H, 1, D) token rows -> (B, H, n, D), the layout a single stream's forward has."""
    return rows.squeeze(2).reshape(batch, new, rows.shape[1], rows.shape[3]).transpose(1, 2)


class _JointCache:
    """Stands in for a cache in a joint pass: each stream's keys and values go to its own cache."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[_StreamTensors, _StreamTensors]:
        """key/value_states: (N, kv_heads, 1, D) token rows; returns every stream's keys and values so far."""
        keys, values = [], []
        for (start, end, batch, new), cache in zip(self.plan.segments, self.plan.caches, strict=True):
            # Contiguous copies: a cache that keeps its first update as given must not hold the pass's rows.
            k = _stream_view(key_states[start:end], batch, new).contiguous()  # (B, kv_heads, n, D)
            v = _stream_view(value_states[start:end], batch, new).contiguous()
            if cache is not None:
                k, v = cache.update(k, v, layer_idx, *args, **kwargs)
            keys.append(k)
            values.append(v)
        return _StreamTensors(keys), _StreamTensors(values)


def _implementation(module: nn.Module, name: str | None) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The attention function ``name`` means for ``module`` (eager: its modeling file's own)."""
    if name is None or name == "eager":
        fn: Callable[..., tuple[torch.Tensor, Any]] = sys.modules[type(module).__module__].eager_attention_forward
        return fn
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, sys.modules[type(module).__module__].eager_attention_forward)


def _joint_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query: (N, H, 1, D) token rows; per stream, the model's attention on its own keys, values and mask.

    Returns (N, 1, H, D), as an attention function returns (B, n, H, D) for its batch.
    """
    if not isinstance(attention_mask, _JointMask):
        raise RuntimeError(f"the {JOINT_ATTENTION} attention runs only inside fedsea.model.joint.joint_forward")
    plan, kind = attention_mask.plan, attention_mask.kind
    inner = _implementation(module, plan.inner)
    outs = []
    for i, (start, end, batch, new) in enumerate(plan.segments):
        q = _stream_view(query[start:end], batch, new)  # (B, H, n, D)
        if "position_ids" in kwargs:  # e.g. flash attention's packed-sequence check: the stream's own
            kwargs["position_ids"] = plan.positions[i]
        out, _ = inner(module, q, key.tensors[i], value.tensors[i], plan.masks[i][kind], **kwargs)  # (B, n, H, D)
        outs.append(out.reshape(batch * new, 1, *out.shape[2:]))
    return torch.cat(outs, dim=0), None


AttentionInterface.register(JOINT_ATTENTION, _joint_attention)


def lora_layers(module: nn.Module) -> Iterator[LoraLayer]:
    """The LoRA layers under ``module``, whichever adapters they hold, not descending into them
    (hundreds of adapter submodules on a server with many sessions)."""
    for child in module.children():
        if isinstance(child, LoraLayer):
            yield child
        else:
            yield from lora_layers(child)


@contextmanager
def _row_adapters(trunk: SplitPart, segments: list[tuple[int, int, str | None]]) -> Iterator[None]:
    """For the block, every LoRA layer of ``trunk`` adds each segment's own adapter to its rows.

    ``segments``: (first row, end row, adapter name or None) in row order. A layer the adapter
    does not target leaves the segment's rows to the base weights, as the adapter alone would.
    """

    scales: dict[tuple[str, ...], torch.Tensor] = {}  # per set of adapters a layer holds: (N, R) row scales

    def row_scales(layer: Any, present: list[tuple[int, int, str]], like: torch.Tensor) -> torch.Tensor:
        """(N, R): each row's adapter scaling on that adapter's rank columns of A_cat, 0 elsewhere."""
        key = tuple(name for _, _, name in present)
        if key not in scales:
            ranks = [layer.r[name] for name in key]
            mask = torch.zeros(rows, sum(ranks), dtype=like.dtype, device=like.device)
            col = 0
            for (start, end, name), rank in zip(present, ranks, strict=True):
                mask[start:end, col : col + rank] = layer.scaling[name]
                col += rank
            scales[key] = mask
        return scales[key]

    def add_deltas(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        layer: Any = module
        x = args[0]  # (N, 1, in)
        present = [(s, e, name) for s, e, name in segments if name is not None and name in layer.lora_A]
        if not present:
            return output
        names = [name for _, _, name in present]
        a_weights = [layer.lora_A[name].weight for name in names]  # (r_s, in) each
        batched = len({w.dtype for w in a_weights}) == 1 and all(layer.lora_B[n].bias is None for n in names)
        if len(present) > 1 and batched:
            # All segments in two matmuls: x (N, in) against every adapter's A stacked (R = sum r_s),
            # the other adapters' columns zeroed by the row scales, then B stacked (out, R): exact
            # zeros, so each row gets its own ``B(A x) * scaling`` up to the order of float sums.
            a_cat = torch.cat(a_weights)  # (R, in)
            b_cat = torch.cat([layer.lora_B[name].weight for name in names], dim=1)  # (out, R)
            xs: torch.Tensor = layer._cast_input_dtype(x, a_cat.dtype).reshape(rows, -1)  # (N, in)
            delta = ((xs @ a_cat.T) * row_scales(layer, present, a_cat)) @ b_cat.T  # (N, out)
            return (output + delta.reshape(output.shape)).to(output.dtype)
        for start, end, name in present:  # one segment (or mixed dtypes): peft's own operations
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            xs = layer._cast_input_dtype(x[start:end], lora_a.weight.dtype)
            delta = lora_b(lora_a(layer.lora_dropout[name](xs))) * layer.scaling[name]
            # peft: ``result + delta``, then back to the base layer's dtype.
            output[start:end] = (output[start:end] + delta).to(output.dtype)
        return output

    rows = segments[-1][1] if segments else 0
    layers: list[Any] = list(lora_layers(trunk.layers))  # peft's LoraLayer mixin is an nn.Module in practice
    handles = []
    saved = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            if layer.merged:
                raise InvalidInputError("adapter", "a joint pass needs unmerged LoRA adapters")
            layer._disable_adapters = True  # the base layer only; the hook adds each segment's LoRA
            handles.append(layer.register_forward_hook(add_deltas))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, flag in zip(layers, saved, strict=True):
            layer._disable_adapters = flag


_Streams = tuple[
    list[tuple[int, int, int, int]], list[dict[str, torch.Tensor | None]], list[torch.Tensor], list[torch.Tensor]
]


def _streams(trunk: SplitPart, inputs: Sequence[JointInput]) -> _Streams:
    """Each stream's checked rows: its (first row, end row, B, n), masks, (B, n) positions and (B*n, 1, d) rows."""
    width = trunk.hidden_size
    device = inputs[0].hidden.device
    segments: list[tuple[int, int, int, int]] = []
    masks, positions, rows = [], [], []
    offset = 0
    for item in inputs:
        hidden = item.hidden
        if hidden.dim() != 3 or hidden.shape[-1] != width or hidden.shape[1] == 0:
            raise InvalidInputError("hidden", f"expected shape (batch, tokens, {width}), got {tuple(hidden.shape)}")
        batch, new = int(hidden.shape[0]), int(hidden.shape[1])
        total = (item.cache.get_seq_length(trunk.start) if item.cache is not None else 0) + new
        check_lengths(item.lengths, batch, total)
        lengths = item.lengths.to(torch.int64)
        # The stream's own masks and positions, as ``SplitPart._run_blocks`` builds them for it alone
        # (before the config's attention is switched: the mask's format follows the implementation).
        attn_2d = None if no_padding(lengths, total) else padding_mask(lengths, total).to(device, non_blocking=True)
        masks.append(trunk._masks(hidden, attn_2d, item.cache))
        positions.append(position_ids(lengths, total, new).to(device, non_blocking=True))  # (B, n)
        segments.append((offset, offset + batch * new, batch, new))
        rows.append(hidden.reshape(batch * new, 1, width))
        offset += batch * new
    return segments, masks, positions, rows


def joint_forward(trunk: SplitPart, inputs: Sequence[JointInput], row_adapters: bool = True) -> list[torch.Tensor]:
    """Run ``trunk``'s blocks once for several streams; return each stream's (B, n, d) output.

    The blocks must be in eval mode (no LoRA dropout) and gradients off; each stream's adapter
    must be injected into ``trunk``'s blocks (as the trunk host does for every session).
    ``trunk`` may be any part (a client joins its own generations' head and tail passes,
    ``fedsea.training.shared_parts``): with ``row_adapters`` False every stream runs the part's
    LoRA layers as they are (its active adapter, or none), the ``adapter`` fields unused.

    Raises:
        InvalidInputError: naming ``hidden`` or ``lengths`` when a stream's input does not fit its cache.
    """
    if not inputs:
        return []
    # The masks' format follows the config's attention implementation: built while no joint pass has it switched.
    with ordinary_forward(trunk.config):
        segments, masks, positions, rows = _streams(trunk, inputs)
    hidden = torch.cat(rows, dim=0)  # (N, 1, d)
    pos = torch.cat([p.reshape(-1, 1) for p in positions], dim=0)  # (N, 1)
    kinds = set(trunk.layer_types.values())
    if trunk.family.rope_per_layer_type:
        ropes = {kind: trunk.rotary_emb(hidden, pos, kind) for kind in kinds}
    else:
        rope = trunk.rotary_emb(hidden, position_ids=pos)  # (cos, sin), each (N, 1, head_dim)
        ropes = dict.fromkeys(kinds, rope)
    adapters = [(s, e, item.adapter) for (s, e, _, _), item in zip(segments, inputs, strict=True)]
    with switched_attention(trunk.config, JOINT_ATTENTION) as inner:
        plan = _Plan(segments, masks, positions, [item.cache for item in inputs], inner)
        cache = _JointCache(plan)
        layer_masks = {kind: _JointMask(plan, kind) for kind in kinds}
        rows_lora = _row_adapters(trunk, adapters) if row_adapters else nullcontext()
        with rows_lora, attention_kernels(hidden.device):
            for key, layer in trunk.layers.items():
                kind = trunk.layer_types[key]
                hidden = layer(
                    hidden,
                    attention_mask=layer_masks[kind],
                    position_ids=pos,
                    cache=cache,
                    use_cache=True,
                    position_embeddings=ropes[kind],
                )
    return [hidden[start:end].reshape(batch, new, trunk.hidden_size) for start, end, batch, new in segments]
