"""A bridge: a small trained stand-in for the trunk, so a client can draft tokens on its own.

Speculative decoding needs a cheap guess of the next few tokens. The self-speculative drafter
(``fedsea.training.bridge_drafter``) makes it with the client's own head and tail, skipping the
trunk it does not have: the bridge maps what the client knows at position t to a guess of the
trunk's output h_{L-q}(t) there, and the client's tail turns that guess into logits.

What the client knows at t is its head's output h_p(t) (the token and a little context) and the
trunk's output at t - 1 (real once verified, the bridge's own guess while drafting). As in
EAGLE (Li et al., 2024), the bridge works at the feature level: one linear map of the
concatenation [h_p(t), h_{L-q}(t - 1)] (2d -> d), then a few decoder blocks of the model's own
kind with their own KV cache. Predicting the next top-level feature from the last one is far
easier than standing in for the trunk from h_p alone (skipping the trunk's 26 blocks of
SmolLM2 with no bridge agrees with the model on 0-2% of tokens).

A bridge is trained once per model and cut (p, q) on public text by whoever holds the whole
public base model (``fedsea bridge train``, ``fedsea.training.bridge_train``) and shipped to the
clients as one safetensors file: the client never needs the trunk's weights or compute to draft.
Its blocks start as copies of the trunk's last blocks. A bridge only ever proposes: the split
model verifies every draft, so a poor bridge costs speed, never correctness.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.masking_utils import create_causal_mask

from fedsea.errors import InvalidInputError
from fedsea.model.attention_switch import ordinary_forward
from fedsea.model.families import family_of
from fedsea.model.split import check_partition

BRIDGE_FORMAT = "fedsea-bridge/1"
# The bridge's blocks: one is EAGLE's choice (its draft model is one decoder layer).
BRIDGE_LAYERS = 1
FULL_ATTENTION = "full_attention"
DRAFT_VOCAB_KEY = "draft_vocab"  # the file's tensor of the drafts' token ids


def _bridge_config(model: PreTrainedModel, num_layers: int) -> Any:
    """The model's config, cut to the bridge's ``num_layers`` blocks, all of full attention.

    The bridge's blocks are the model's kind of block built from this config, so its KV cache
    (``DynamicCache(config=...)``) and masks come from transformers as for any model.
    """
    config = type(model.config).from_dict(model.config.to_dict())
    config.num_hidden_layers = num_layers
    # Not in to_dict(): the same kernels. Read while no joint pass has the model's config switched.
    with ordinary_forward(model.config):
        config._attn_implementation = model.config._attn_implementation
    if hasattr(config, "layer_types"):
        config.layer_types = [FULL_ATTENTION] * num_layers
    if hasattr(config, "sliding_window"):
        config.sliding_window = None
    return config


class Bridge(nn.Module):
    """``bridge(h_p (B, n, d), prev (B, n, d), positions (B, n), cache) -> guess of h_{L-q} (B, n, d)``.

    ``prev[:, j]`` is the trunk's output at the position before ``positions[:, j]`` (zeros
    before the first token). Rows have no padding (drafting is batch 1; training uses packed
    windows of text).

    Args:
        model: the whole model (its config, its rotary embedding, which has no weights).
        head_layers, tail_layers: the cut (p, q) this bridge stands in for.
        num_layers: the bridge's decoder blocks.
    """

    def __init__(self, model: PreTrainedModel, head_layers: int, tail_layers: int, num_layers: int = BRIDGE_LAYERS):
        super().__init__()
        total = int(model.config.num_hidden_layers)
        check_partition(total, head_layers, tail_layers)
        if num_layers < 1:
            raise ValueError(f"a bridge needs at least one block, got {num_layers}")
        self.head_layers, self.tail_layers, self.model_layers = head_layers, tail_layers, total
        self.config = _bridge_config(model, num_layers)
        self.family = family_of(model)
        d = int(model.config.hidden_size)
        self.fc = nn.Linear(2 * d, d, bias=False)
        block_class = type(model.model.layers[0])
        self.layers = nn.ModuleList([block_class(self.config, i) for i in range(num_layers)])
        # Rotary embedding has no trainable weights (an inv_freq buffer): shared, never saved.
        self.rotary_emb = [model.model.rotary_emb]  # in a list: not a submodule, not in state_dict()
        # (N,) sorted token ids the drafts are chosen among (``train_bridge``'s ``draft_vocab``);
        # None: the whole vocabulary. Saved beside the weights, not a buffer (older files lack it).
        self.draft_vocab: torch.Tensor | None = None
        param = next(model.parameters())
        self.to(device=param.device, dtype=param.dtype)

    @classmethod
    def from_model(
        cls, model: PreTrainedModel, head_layers: int, tail_layers: int, num_layers: int = BRIDGE_LAYERS
    ) -> Bridge:
        """An untrained bridge: copies of the trunk's last ``num_layers`` blocks, ``fc`` passing ``prev`` on.

        Where training starts: with ``fc = [0 | I]`` the blocks see the last position's trunk
        output, the closest thing to the one being guessed.
        """
        bridge = cls(model, head_layers, tail_layers, num_layers)
        last = int(model.config.num_hidden_layers) - tail_layers  # the trunk's blocks end here
        for i, block in enumerate(bridge.layers):
            state = model.model.layers[last - num_layers + i].state_dict()
            # The base block's weights, without a client's LoRA (peft wraps each target in base_layer).
            block.load_state_dict({k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k})
        d = bridge.fc.in_features // 2
        with torch.no_grad():
            bridge.fc.weight.zero_()
            bridge.fc.weight[:, d:].copy_(torch.eye(d))
        return bridge

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for the bridge's blocks."""
        return DynamicCache(config=self.config)

    def forward(
        self, hidden: torch.Tensor, prev: torch.Tensor, positions: torch.Tensor, cache: DynamicCache | None = None
    ) -> torch.Tensor:
        """The guesses (B, n, d) of the trunk's output at ``positions``; ``cache`` grows by n slots."""
        x: torch.Tensor = self.fc(torch.cat([hidden, prev], dim=-1))  # (B, n, d)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=x, attention_mask=None, cache=cache, position_ids=None, layer_idx=0
        )
        rotary = self.rotary_emb[0]
        if self.family.rope_per_layer_type:
            rope = rotary(x, positions, FULL_ATTENTION)
        else:
            rope = rotary(x, position_ids=positions)
        for block in self.layers:
            x = block(
                x,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=rope,
            )
        return x


def save_bridge(bridge: Bridge, path: str | os.PathLike[str], info: dict[str, Any] | None = None) -> Path:
    """Write ``bridge`` as one safetensors file (atomically: a temporary file, then a rename).

    The header's metadata holds the format, the cut, the block count, the model's shape and
    ``info`` (training figures), as JSON: nothing is pickled.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": BRIDGE_FORMAT,
        "head_layers": bridge.head_layers,
        "tail_layers": bridge.tail_layers,
        "num_layers": len(bridge.layers),
        "hidden_size": bridge.fc.out_features,
        "model_layers": bridge.model_layers,
        "info": info or {},
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in bridge.state_dict().items()}
    if bridge.draft_vocab is not None:
        tensors[DRAFT_VOCAB_KEY] = bridge.draft_vocab.to("cpu", torch.int64).contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"fedsea": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def read_bridge_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a bridge file; a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no bridge file at {path} (make one with `fedsea bridge train`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("fedsea")
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise InvalidInputError("bridge", f"{path} is not a safetensors file: {exc}") from exc
    meta: dict[str, Any] = json.loads(raw) if raw else {}
    if meta.get("format") != BRIDGE_FORMAT:
        raise InvalidInputError("bridge", f"{path} is not a fedsea bridge (format {meta.get('format')!r})")
    return meta


def load_bridge(path: str | os.PathLike[str], model: PreTrainedModel, head_layers: int, tail_layers: int) -> Bridge:
    """Load a bridge for ``model`` cut at (``head_layers``, ``tail_layers``); refuse one made for another.

    Raises:
        InvalidInputError: another cut or model shape, or not a bridge file.
    """
    meta = read_bridge_meta(path)
    cut = (int(meta["head_layers"]), int(meta["tail_layers"]))
    if cut != (head_layers, tail_layers):
        raise InvalidInputError(
            "bridge",
            f"{path} was trained for the cut (p, q) = {cut}, this model is cut at ({head_layers}, {tail_layers}); "
            "train one for this cut with `fedsea bridge train --head-layers P --tail-layers Q`",
        )
    shape = (int(meta["model_layers"]), int(meta["hidden_size"]))
    if shape != (int(model.config.num_hidden_layers), int(model.config.hidden_size)):
        raise InvalidInputError(
            "bridge",
            f"{path} is for a model of {shape[0]} blocks of width {shape[1]}, this one has "
            f"{model.config.num_hidden_layers} of width {model.config.hidden_size}",
        )
    bridge = Bridge(model, head_layers, tail_layers, int(meta["num_layers"]))
    param = next(model.parameters())
    with safe_open(str(path), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    state = {k: v if k == DRAFT_VOCAB_KEY else v.to(device=param.device, dtype=param.dtype) for k, v in state.items()}
    vocab = state.pop(DRAFT_VOCAB_KEY, None)
    if vocab is not None:
        vocab = vocab.to(device=param.device, dtype=torch.int64)
        size = int(model.get_output_embeddings().weight.shape[0])
        if vocab.dim() != 1 or not vocab.numel() or int(vocab.min()) < 0 or int(vocab.max()) >= size:
            raise InvalidInputError("bridge", f"{path}: its draft vocabulary has ids outside the model's {size}")
        bridge.draft_vocab = vocab
    missing, unexpected = bridge.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InvalidInputError("bridge", f"{path} does not fit the model: missing {missing}, unexpected {unexpected}")
    return bridge.eval()
