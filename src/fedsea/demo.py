"""``make demo``: the default model split at (2, 2) answers one chat prompt.

The same prompt is answered greedily through the three parts (each with its own KV cache)
and through the unsplit Hugging Face model; the answers must be identical. The bytes that
crossed each cut are printed. Later issues grow this into the federated demo.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fedsea.model.generate import CutTraffic, split_greedy_generate
from fedsea.model.load import DEFAULT_MODEL, load_model, load_tokenizer
from fedsea.model.split import split_model

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


@dataclass(frozen=True)
class DemoResult:
    split_answer: str
    central_answer: str
    traffic: CutTraffic
    prompt_tokens: int
    new_tokens: int

    @property
    def identical(self) -> bool:
        return self.split_answer == self.central_answer


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def run_demo(
    source: str = DEFAULT_MODEL,
    head_layers: int = 2,
    tail_layers: int = 2,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 48,
    echo: bool = True,
) -> DemoResult:
    say = print if echo else (lambda *a, **k: None)
    t0 = time.perf_counter()
    model = load_model(source)
    tokenizer = load_tokenizer(source)
    cfg = model.config
    say(
        f"model      {source}: {cfg.num_hidden_layers} blocks, width {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}, tied embeddings: {cfg.tie_word_embeddings} ({time.perf_counter() - t0:.1f} s)"
    )
    split = split_model(model, head_layers=head_layers, tail_layers=tail_layers)
    say(f"split      head = embedding + blocks [0, {split.head.end})   (client)")
    say(f"           trunk = blocks [{split.trunk.start}, {split.trunk.end})            (server)")
    say(f"           tail = blocks [{split.tail.start}, {split.num_layers}) + norm + LM head  (client)")

    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    lengths = enc["attention_mask"].sum(dim=1)
    say(f"prompt     {prompt!r} ({int(lengths[0])} tokens with the chat template)")

    traffic = CutTraffic()
    t1 = time.perf_counter()
    split_ids = split_greedy_generate(
        split,
        enc["input_ids"],
        lengths,
        max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        traffic=traffic,
    )
    t_split = time.perf_counter() - t1
    t2 = time.perf_counter()
    with torch.no_grad():
        central_ids = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[:, enc["input_ids"].shape[1] :]
    t_central = time.perf_counter() - t2
    split_answer = tokenizer.decode(split_ids[0], skip_special_tokens=True).strip()
    central_answer = tokenizer.decode(central_ids[0], skip_special_tokens=True).strip()
    result = DemoResult(split_answer, central_answer, traffic, int(lengths[0]), int(split_ids.shape[1]))

    say(f"\nsplit      ({t_split:.2f} s): {split_answer}")
    say(f"unsplit    ({t_central:.2f} s): {central_answer}")
    say(f"identical  {'yes' if result.identical else 'NO'}")
    prefill = traffic.per_step[0]
    step = traffic.per_step[1] if len(traffic.per_step) > 1 else 0
    say(f"\nbytes across the cuts ({traffic.messages} messages, fp32 hidden states + int32 lengths):")
    say(f"  head -> trunk (client to server): {_human(traffic.head_to_trunk)}")
    say(f"  trunk -> tail (server to client): {_human(traffic.trunk_to_tail)}")
    say(
        f"  prefill {_human(prefill)} both ways; then {_human(step)} per new token "
        f"(one {cfg.hidden_size}-wide vector each way: the KV caches stay where they are)"
    )
    say(f"total {time.perf_counter() - t0:.1f} s")
    return result
