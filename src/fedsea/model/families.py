"""The decoder families fedsea can split, and what differs between them, in one table.

Every family here is built by transformers from the same parts: ``model.model.embed_tokens``,
``model.model.layers`` (decoder blocks taking ``position_embeddings`` and one attention mask),
``model.model.rotary_emb``, ``model.model.norm`` and ``model.lm_head``. What a family's own
``forward`` does *between* those parts is what the split must reproduce:

- which mask each block gets: ``layer_types`` below (full or sliding-window attention), the
  same rule transformers' ``DynamicCache`` uses to pick each layer's cache;
- whether the rotary embedding depends on the layer type (Gemma 3: local and global rope);
- the final logit soft-capping (Gemma 2 and 3, ``config.final_logit_softcapping``), which the
  tail applies after the LM head.

The rest lives inside modules the parts hold anyway, so it needs nothing here: Gemma's scaled
embedding (``embed_tokens`` multiplies by sqrt(d) itself), attention soft-capping and Qwen 3's
q/k norms (inside the attention), Phi-3's fused ``qkv_proj``/``gate_up_proj`` (inside the
block), LLaMA 3's rope scaling (inside ``rotary_emb``).

Not splittable: a Gemma 3 text config with ``use_bidirectional_attention`` (an encoder-style
mask overlay, not a causal LM that can generate token by token) is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedsea.errors import UnsupportedModelError

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# Phi-3 fuses q, k, v into one projection and gate, up into another: LoRA targets named the
# LLaMA way adapt the fused module (q_proj alone adapts all of qkv_proj).
_PHI3_FUSED: dict[str, str] = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


@dataclass(frozen=True)
class Family:
    """One decoder family: its Hugging Face class and the hooks the split applies for it.

    Args:
        name: short name shown to users (``fedsea info``).
        model_type: ``config.model_type`` of the family.
        architecture: the causal-LM class name transformers builds for it.
        rope_per_layer_type: ``rotary_emb(x, pos, layer_type)`` gives each layer type its own
            cos/sin (Gemma 3); otherwise one rotary embedding serves every block.
        target_aliases: LoRA target names translated to the family's module names.
        notes: what is particular about the family (README, ``fedsea info``).
    """

    name: str
    model_type: str
    architecture: str
    rope_per_layer_type: bool = False
    target_aliases: Mapping[str, str] = field(default_factory=dict)
    notes: str = ""

    def lora_targets(self, targets: Iterable[str]) -> tuple[str, ...]:
        """``targets`` in the family's module names, in order, without duplicates."""
        out: list[str] = []
        for target in targets:
            name = self.target_aliases.get(target, target)
            if name not in out:
                out.append(name)
        return tuple(out)

    def check_config(self, config: Any) -> None:
        """Raise ``UnsupportedModelError`` for a config of this family the split cannot reproduce."""
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                f"cannot split {self.architecture} with use_bidirectional_attention=True: its blocks see "
                "later tokens, so it is not a causal LM that a split can run token by token"
            )
        if not getattr(config, "is_causal", True):
            raise UnsupportedModelError(f"cannot split {self.architecture} with is_causal=False")


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("llama", "llama", "LlamaForCausalLM", notes="LLaMA 1/2/3.x (llama3 rope scaling), SmolLM2"),
        Family("qwen2", "qwen2", "Qwen2ForCausalLM", notes="Qwen2/2.5; sliding window on layers >= max_window_layers"),
        Family("qwen3", "qwen3", "Qwen3ForCausalLM", notes="q/k RMS norms inside the attention"),
        Family("mistral", "mistral", "MistralForCausalLM", notes="sliding window on every block when set"),
        Family(
            "gemma2",
            "gemma2",
            "Gemma2ForCausalLM",
            notes="scaled embedding, alternating sliding/full attention, attention and final logit soft-capping",
        ),
        Family(
            "gemma3",
            "gemma3_text",
            "Gemma3ForCausalLM",
            rope_per_layer_type=True,
            notes="text-only; local/global rope per layer type, sliding/full pattern, q/k norms, scaled embedding",
        ),
        Family(
            "phi3",
            "phi3",
            "Phi3ForCausalLM",
            target_aliases=_PHI3_FUSED,
            notes="fused qkv_proj and gate_up_proj (LoRA on q/k/v_proj adapts qkv_proj)",
        ),
    )
}


def family_of(model: Any) -> Family:
    """The family of ``model`` (a causal LM), or ``UnsupportedModelError`` naming those supported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(str(model_type))
    if family is None or type(model).__name__ != family.architecture:
        supported = ", ".join(f"{f.model_type} ({f.architecture})" for f in FAMILIES.values())
        raise UnsupportedModelError(
            f"cannot split {type(model).__name__} (model_type={model_type!r}); supported: {supported}"
        )
    family.check_config(config)
    return family


def layer_types(config: Any) -> tuple[str, ...]:
    """Each block's attention kind, ``full_attention`` or ``sliding_attention`` (L,).

    ``config.layer_types`` where the family has it (Qwen 2/3, Gemma 2/3); otherwise every block
    slides when ``config.sliding_window`` is set (Mistral, Phi-3) and none does (LLaMA). This is
    the rule each family's forward and transformers' ``DynamicCache`` follow.
    """
    num_layers = int(config.num_hidden_layers)
    declared = getattr(config, "layer_types", None)
    if declared is not None:
        kinds = tuple(str(kind) for kind in declared[:num_layers])
    else:
        sliding = getattr(config, "sliding_window", None) is not None
        kinds = (SLIDING_ATTENTION if sliding else FULL_ATTENTION,) * num_layers
    unknown = sorted(set(kinds) - {FULL_ATTENTION, SLIDING_ATTENTION})
    if unknown:
        raise UnsupportedModelError(f"cannot split a model with layer types {unknown} (only full and sliding)")
    return kinds
