"""A tiny random LLaMA and a real byte-level BPE tokenizer, both built offline.

For tests and examples: the model is a genuine ``LlamaForCausalLM`` with random weights
(seeded, so two processes building it get identical weights) and the tokenizer is a real
``tokenizers`` byte-level BPE trained in milliseconds on a small embedded corpus, so any
text round-trips through it. Nothing is downloaded.
"""

from __future__ import annotations

import functools
from typing import TypedDict, Unpack

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedsea.model.seeding import seeded

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# 256 byte symbols of the byte-level alphabet plus the special tokens.
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

# ChatML, the format SmolLM2-Instruct uses too.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
Federated learning lets several organisations train one model together without pooling
their data. In split learning the model is cut into parts: the client keeps the first and
the last blocks, and a server runs the middle. Only hidden states and their gradients cross
the network. The movie was a delight from start to finish, with sharp writing and warm
performances. The plot is thin and the jokes fall flat; I would not watch it again.
Question: is the sky blue on a clear day? Answer: yes. Question: do fish climb trees?
Answer: no. The patient was admitted on Monday and discharged two days later in good health.
The bank reported higher revenue this quarter, driven by lending and lower costs.
Summarize the article in one sentence. The council approved a new park near the river.
Who wrote the letter? She did. When did they arrive? In the morning, before nine o'clock.
Premise: the glass fell off the table. Hypothesis: the glass broke. Label: entailment.
the of and to in is that it for was on with as be at by this had not are but from or have
an they which one you were her all she there would their we him been has when who will
more no if out so said what up its about into than them can only other new some could
time these two may then do first any my now such like our over man me even most made after
also did many before must through back years where much your way well down should because
each just those people how too little state good very make world still own see men work
long get here between both life being under never day same another know while last might
us great old year off come since against go came right used take three numbers 0 1 2 3 4
5 6 7 8 9 10 100 1000 . , ; : ! ? ' " ( ) - A B C D E F G H I J K L M N O P Q R S T U V W
"""


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with at most ``vocab_size`` entries, ChatML chat template.

    Ids 0, 1, 2 are ``<|endoftext|>``, ``<|im_start|>`` (bos) and ``<|im_end|>`` (eos and pad),
    as in SmolLM2. Padding is on the left, as fedsea's split expects.
    """
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB} (byte alphabet + specials), got {vocab_size}")
    backend = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    vocab_size: int = 512,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
) -> LlamaConfig:
    """A small ``LlamaConfig`` (SmolLM2-like token ids) with a checked head layout; kv heads default to half."""
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    kv = num_kv_heads if num_kv_heads is not None else max(1, num_heads // 2)
    if num_heads % kv != 0:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({kv})")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=kv,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        rms_norm_eps=1e-5,
        # Larger than HF's 0.02 default so that the random model's outputs are not near uniform.
        initializer_range=0.1,
    )


class _ConfigKwargs(TypedDict, total=False):
    """The optional ``tiny_llama_config`` arguments ``tiny_llama`` passes through."""

    intermediate_size: int | None
    max_position_embeddings: int
    tie_word_embeddings: bool


def tiny_llama(
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    vocab_size: int = 512,
    seed: int = 0,
    **config_kwargs: Unpack[_ConfigKwargs],
) -> LlamaForCausalLM:
    """A seeded random ``LlamaForCausalLM``; the same arguments give the same weights.

    Args:
        num_layers: L, number of decoder blocks.
        hidden_size: d, the width.
        num_heads: attention heads; ``num_kv_heads`` defaults to half (grouped-query attention).
        vocab_size: should be >= ``len(tiny_tokenizer(vocab_size))``.
        seed: seed of the weight initialisation (the global RNG is left untouched).
    """
    config = tiny_llama_config(num_layers, hidden_size, num_heads, num_kv_heads, vocab_size, **config_kwargs)
    with seeded(seed):
        model = LlamaForCausalLM(config)
    model.eval()
    return model
