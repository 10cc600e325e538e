"""``make demo``: the main job on the embedded default model.

``run_demo`` (``fedsea demo``): three clients fine-tune SmolLM2-135M-Instruct on SST-2 through
one trunk server (separate processes, TLS, noise on h_p, hierarchical mode), next to the
centralized baseline; then one answer is generated through the split with the federated
adapters. ``run_split_demo`` (``fedsea demo --split-only``): the default model split at (2, 2)
answers a chat prompt through the three parts and through the unsplit model, identically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from fedsea.config import SplitConfig
from fedsea.experiments.constants import SPLIT_DEMO_NEW_TOKENS as SPLIT_DEMO_NEW_TOKENS
from fedsea.model.load import DEFAULT_MODEL, load_model, load_tokenizer
from fedsea.model.split import split_model
from fedsea.training.generation import split_greedy_generate
from fedsea.training.stepper import CutTraffic

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


@dataclass(frozen=True)
class DemoResult:
    """What the split demo produced: both answers, the cut traffic and the token counts."""

    split_answer: str
    central_answer: str
    traffic: CutTraffic
    prompt_tokens: int
    new_tokens: int

    @property
    def identical(self) -> bool:
        """True when the split and the unsplit model answered with the same text."""
        return self.split_answer == self.central_answer


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run_split_demo(
    source: str = DEFAULT_MODEL,
    head_layers: int = SplitConfig.head_layers,
    tail_layers: int = SplitConfig.tail_layers,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = SPLIT_DEMO_NEW_TOKENS,
    echo: bool = True,
) -> DemoResult:
    """Answer ``prompt`` greedily through the split model and through the unsplit one; compare."""
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
        # load_model is typed PreTrainedModel; generate comes from GenerationMixin on the concrete class.
        central_ids = model.generate(  # type: ignore[operator]
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[:, enc["input_ids"].shape[1] :]
    t_central = time.perf_counter() - t2
    # One sequence decodes to one str (the stub's list[str] is for a batch).
    split_answer = cast(str, tokenizer.decode(split_ids[0], skip_special_tokens=True)).strip()
    central_answer = cast(str, tokenizer.decode(central_ids[0], skip_special_tokens=True)).strip()
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


DEMO_REVIEW = "A gorgeous, witty film with a big heart; I loved every minute of it."


def run_demo(overrides: tuple[str, ...] = (), run_dir: str | None = None) -> dict[str, object]:
    """The federated demo; returns the run's summary."""
    from importlib.resources import files

    from fedsea.client.split_client import SplitClient
    from fedsea.federation.checkpoint import latest_round, load_round
    from fedsea.federation.simconfig import load_plan
    from fedsea.flower.simulation import simulate
    from fedsea.model.adapters import load_adapter_state_dict
    from fedsea.privacy.calibration import resolve_noise
    from fedsea.server.app import ServerThread, TrunkServer
    from fedsea.server.trunk import TrunkHost

    config = str(files("fedsea.federation").joinpath("demo.toml"))
    start = time.perf_counter()
    print("fedsea demo: 3 clients fine-tune SmolLM2-135M-Instruct on SST-2 through one trunk server")
    print("(on Flower's Simulation Engine; the trunk over loopback gRPC with mutual TLS and tokens; noise on h_p)\n")
    summary = simulate(config, list(overrides), run_dir=run_dir, centralized=True)
    plan = load_plan(Path(str(summary["run_dir"])) / "config.toml")
    metric = summary["metric"]
    print(f"\n{'':<34}{metric}")
    print(f"{'before fine-tuning (zero-shot)':<34}{summary['before']:.3f}")
    print(f"{'federated, after ' + str(summary['rounds_completed']) + ' rounds':<34}{summary['after']:.3f}")
    print(f"{'centralized, same budget':<34}{summary['centralized']:.3f}")
    print(f"bytes moved by the 3 clients: {summary['bytes_moved'] / 2**20:.1f} MiB")
    for name, noise in dict(summary.get("noise") or {}).items():
        print(f"noise of {name}: {noise['summary']}")

    # One answer through the split, with the federated adapters and the run's noise.
    checkpoint = latest_round(summary["run_dir"])
    assert checkpoint is not None, "the demo run wrote no checkpoint"
    _, state, _, _ = load_round(checkpoint)
    tokenizer = load_tokenizer(plan.model)
    first = plan.clients[0]  # the demo's clients share one split (fedsea demo --head-layers/--tail-layers)
    mine, served = first.placement(), plan.config.server_model()  # the run's devices and dtypes
    client_model = load_model(plan.model, mine.dtype, mine.device)
    split = split_model(client_model, first.head_layers, first.tail_layers).add_lora(plan.lora)
    noise = resolve_noise(plan.noise, split.head, tokenizer)  # measured before the adapters load
    for part in split.parts().values():
        load_adapter_state_dict(part, state, strict=False)
    from fedsea import tasks

    example = tasks.get_task("sst2").to_example({"sentence": DEMO_REVIEW, "label": 1, "idx": 0})
    with (
        ServerThread(TrunkServer(TrunkHost(load_model(plan.model, served.dtype, served.device, spread=True)))) as port,
        SplitClient(f"127.0.0.1:{port}", split, noise=noise.noise, tokenizer=tokenizer) as client,
    ):
        answer = client.generate([example.prompt], max_new_tokens=8)[0]
    print(f"\nsplit-generated answer with the federated adapters (noise on):\n  prompt: {example.prompt!r}")
    print(f"  answer: {answer.strip()!r}")
    print(f"\nreport: {summary['report']}   ({time.perf_counter() - start:.0f} s in all)")
    return summary
