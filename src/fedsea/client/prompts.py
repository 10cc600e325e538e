"""Prompts to token ids for ``SplitClient.generate``: chat template, left padding, checked ids."""

from __future__ import annotations

from typing import Any

import torch

from fedsea.model.split import SplitModel, check_token_ids


def encode_prompts(
    tokenizer: Any, split: SplitModel, prompts: str | list[str] | list[dict[str, str]], chat: bool | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize prompts, or one conversation (a list of {"role", "content"} messages): left-padded
    ids (B, n) on the head's device and their lengths (B,)."""
    if tokenizer is None:
        raise ValueError("generate needs a tokenizer: SplitClient(..., tokenizer=fedsea.load_tokenizer(...))")
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise ValueError("no prompts")
    use_chat = getattr(tokenizer, "chat_template", None) is not None if chat is None else chat
    if all(isinstance(m, dict) for m in items):
        if not use_chat:
            raise ValueError("a conversation needs a tokenizer with a chat template")
        conversations: list[list[Any]] = [items]
    else:
        conversations = [[{"role": "user", "content": t}] for t in items]
    if use_chat:
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    else:
        texts = [str(c[0]["content"]) for c in conversations]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not use_chat)
    device = split.model.device  # the head's (the tokenizer makes CPU tensors)
    check_token_ids(enc["input_ids"], split.head.embed_tokens.num_embeddings)  # before the move
    return enc["input_ids"].to(device), enc["attention_mask"].sum(dim=1).to(device)


__all__ = ["encode_prompts"]
