"""From an ``Example`` to token ids: the prompt, the answer and the end of the answer's turn.

Design decisions:
- A tokenizer with a chat template gets the example's prompt as one user message, rendered
  with ``add_generation_prompt=True``; the answer is the assistant's reply, and the turn ends
  with whatever the template puts after a reply (ChatML's ``<|im_end|>``), found by rendering
  a sentinel reply, so that no template is special-cased.
- A tokenizer without a template gets ``"<prompt>\\nAnswer:"`` and the answer after a space.
- Prompt and answer are tokenized separately and concatenated, so that scoring, generation
  and training all see the same prompt ids (the template's rendering of a whole
  conversation tokenizes to the same ids: tested).
- An example with an empty prompt (a JSONL ``text`` row) is plain language modelling: no
  template, the whole text is the target.
"""

from __future__ import annotations

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedsea.tasks.base import Example

_SENTINEL = "FEDSEA_ANSWER_SENTINEL"


def uses_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer has a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _messages(user: str, system: str | None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return [*head, {"role": "user", "content": user}]


def render_prompt(tokenizer: PreTrainedTokenizerBase, user: str, system: str | None = None) -> str:
    """The prompt text up to where the answer starts.

    Args:
        tokenizer: its chat template is used when it has one.
        user: the user message (``Example.prompt``).
        system: a system message; ``None`` keeps the template's default (SmolLM2 adds one).
    """
    if uses_chat_template(tokenizer):
        return str(tokenizer.apply_chat_template(_messages(user, system), tokenize=False, add_generation_prompt=True))
    prefix = f"{system}\n\n" if system else ""
    return f"{prefix}{user}\nAnswer:"


def answer_text(tokenizer: PreTrainedTokenizerBase, answer: str) -> str:
    """The answer as it follows the prompt (after a space without a chat template)."""
    return answer if uses_chat_template(tokenizer) else f" {answer}"


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """What ends an assistant reply: the template's text after a reply (whitespace stripped), else EOS."""
    if uses_chat_template(tokenizer):
        messages = [*_messages("x", None), {"role": "assistant", "content": _SENTINEL}]
        full = str(tokenizer.apply_chat_template(messages, tokenize=False))
        if _SENTINEL in full:
            tail = full.split(_SENTINEL, 1)[1].strip()
            if tail:
                return tail
    return str(tokenizer.eos_token or "")


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


def end_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of ``end_of_turn`` (``[]`` when the tokenizer has neither a template end nor EOS)."""
    return _ids(tokenizer, end_of_turn(tokenizer))


def stop_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token that ends generation: the first of ``end_ids``, else EOS."""
    ids = end_ids(tokenizer)
    return ids[0] if ids else tokenizer.eos_token_id


def encode_prompt(tokenizer: PreTrainedTokenizerBase, example: Example, system: str | None = None) -> list[int]:
    """Token ids of the rendered prompt (special tokens come from the template, not added again)."""
    if not example.prompt:
        return []
    text = render_prompt(tokenizer, example.prompt, system)
    return _ids(tokenizer, text, special=not uses_chat_template(tokenizer))


def encode_answer(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """Token ids of an answer as it follows the prompt (no end-of-turn)."""
    return _ids(tokenizer, answer_text(tokenizer, answer))


def encode_for_training(
    tokenizer: PreTrainedTokenizerBase, example: Example, system: str | None = None
) -> tuple[list[int], int]:
    """``(ids, loss_from)``: prompt + target answer + end of turn; the loss starts at the answer.

    For an example without a prompt (plain text), the ids are the text with the tokenizer's
    own special tokens and an EOS, and the loss covers all of it (``loss_from = 0``).
    """
    if not example.prompt:
        ids = _ids(tokenizer, example.target, special=True)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return ids + eos, 0
    prompt = encode_prompt(tokenizer, example, system)
    return prompt + encode_answer(tokenizer, example.target) + end_ids(tokenizer), len(prompt)
