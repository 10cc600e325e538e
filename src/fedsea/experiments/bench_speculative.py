"""``fedsea bench generate --speculative``: split speculative decoding against plain split generation.

Greedy answers to real prompts (XSum summaries and QuAC answers, from the offline data, through
the model's chat template) are generated twice on one server, plain and with speculative
decoding, on loopback and under an emulated one-way latency (``NetShaper``). Reported per task:
tokens per round trip (new tokens over generate round trips, the prefill's included), tok/s of
each, and whether the tokens are the same (greedy speculative decoding must not change them).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import torch

from fedsea.config import SplitConfig, WireConfig
from fedsea.model.device import resolve_wire_dtype
from fedsea.model.load import DEFAULT_MODEL, load_model, load_tokenizer
from fedsea.training.generation_config import GenerationConfig
from fedsea.wire.ports import free_loopback_port

# Tasks measured and which end of a long input is kept: an XSum article's lead, a QuAC
# dialogue's end (the question being asked is last).
SPECULATIVE_TASKS: dict[str, str] = {"xsum": "start", "quac": "end"}


def _prompts(task: str, count: int, tokenizer: Any, max_prompt_tokens: int, data_dir: str | None) -> list[str]:
    """The first ``count`` prompts of ``task``'s evaluation split, inputs cut to ``max_prompt_tokens``."""
    from fedsea.tasks import get_task

    examples, _ = get_task(task).examples(data_dir=data_dir, limit=count)
    out = []
    for example in examples[:count]:
        body, instruction = example.prompt.rsplit("\n\n", 1)
        ids = tokenizer(body, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_tokens:
            ids = ids[:max_prompt_tokens] if SPECULATIVE_TASKS[task] == "start" else ids[-max_prompt_tokens:]
            body = tokenizer.decode(ids)
        out.append(f"{body}\n\n{instruction}")
    return out


def _timed(client: Any, prompts: list[str], config: Any) -> tuple[list[list[int]], float, int]:
    """Generate each prompt alone: (token ids per prompt, seconds, generate round trips)."""
    assert client.connection is not None
    before = client.connection.meter.rpc("generate").calls
    ids: list[list[int]] = []
    t0 = time.perf_counter()
    for prompt in prompts:
        input_ids, lengths = _encode(client, prompt)
        ids.append(client.generate_ids(input_ids, lengths, config).token_ids[0])
    seconds = time.perf_counter() - t0
    return ids, seconds, client.connection.meter.rpc("generate").calls - before


def _encode(client: Any, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    from fedsea.client.prompts import encode_prompts

    return encode_prompts(client.tokenizer, client.split, prompt, None)


def bench_speculative(
    model: str = DEFAULT_MODEL,
    prompts_per_task: int = 3,
    new_tokens: int = 48,
    max_prompt_tokens: int = 384,
    head_layers: int = SplitConfig.head_layers,
    tail_layers: int = SplitConfig.tail_layers,
    latency_ms: float = 25.0,
    draft_tokens: int | None = None,
    speculative: str = "prompt-lookup",
    wire_dtype: str = WireConfig.dtype,
    device: str = "cpu",
    dtype: str = "float32",
    data_dir: str | None = None,
    threads: int | None = 1,
    min_ngram: int | None = None,
) -> dict[str, Any]:
    """Plain against speculative split generation, per task, on loopback and at ``latency_ms``.

    Args:
        prompts_per_task: prompts of each task (each generated alone: speculation is batch 1).
        new_tokens: at most this many new tokens per answer (greedy; an answer may end at EOS).
        max_prompt_tokens: a longer input is cut (the article's start, the dialogue's end).
        speculative, draft_tokens: the drafter and k (``GenerationConfig``; None: the drafter's default).
        min_ngram: prompt lookup's shortest match (``prompt_lookup_min_ngram``; None: the default).
        threads: CPU threads of the client and of the server process (default 1 each: the two
            share the machine's cores, and two multi-threaded processes on two cores make OpenMP
            barriers, hence every step carrying several tokens, several times slower); None
            keeps torch's default.

    Returns:
        One dict: per task (``xsum``, ``quac``) the tokens, ``spec_tokens_per_round_trip``,
        ``plain_tok_s``/``spec_tok_s`` on loopback and shaped, their ratios and ``identical``;
        headline ``spec_tokens_per_round_trip`` and ``spec_vs_plain_25ms`` of the best task,
        ``spec_vs_plain_loopback`` over all the prompts together (and ``..._worst_task``).
    """
    from fedsea.client.split_client import SplitClient
    from fedsea.experiments.bench_server import bench_device, bench_dtype, start_bench_server, stop_server
    from fedsea.model.split import split_model
    from fedsea.wire.shaper import NetShaper

    where = bench_device(device)
    torch_dtype = bench_dtype(dtype, where)
    dtype = str(torch_dtype).removeprefix("torch.")
    wire_dtype = resolve_wire_dtype(wire_dtype, torch_dtype)
    port = free_loopback_port()
    saved = os.environ.get("OMP_NUM_THREADS")
    if threads is not None:  # the server process reads it when it starts
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    try:
        server = start_bench_server(model, port, str(where), dtype)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    tokenizer = load_tokenizer(model)
    plain = GenerationConfig(max_new_tokens=new_tokens)  # EOS: the tokenizer's (SplitClient fills it in)
    spec = GenerationConfig(max_new_tokens=new_tokens, speculative=speculative, num_draft_tokens=draft_tokens)
    if min_ngram is not None:
        spec = dataclasses.replace(spec, prompt_lookup_min_ngram=min_ngram)
    prompts = {t: _prompts(t, prompts_per_task, tokenizer, max_prompt_tokens, data_dir) for t in SPECULATIVE_TASKS}
    results: dict[str, Any] = {
        "bench": "generate-speculative",
        "model": model,
        "device": str(where),
        "dtype": dtype,
        "speculative": speculative,
        "draft_tokens": spec.draft_tokens(),
        "prompt_lookup_min_ngram": spec.prompt_lookup_min_ngram,
        "new_tokens": new_tokens,
        "prompts_per_task": prompts_per_task,
        "max_prompt_tokens": max_prompt_tokens,
        "net_latency_ms": latency_ms,
        "threads_per_process": threads,
    }
    try:
        split = split_model(load_model(model, torch_dtype, where), head_layers, tail_layers)
        runs: dict[str, dict[str, Any]] = {t: {} for t in SPECULATIVE_TASKS}
        for where_name, shaper in (("loopback", NetShaper()), ("shaped", NetShaper(latency_ms=latency_ms))):
            with SplitClient(
                f"127.0.0.1:{port}", split, wire_dtype=wire_dtype, shaper=shaper, tokenizer=tokenizer
            ) as client:
                _timed(client, ["Hi"], GenerationConfig(max_new_tokens=4))  # warm up
                for task, texts in prompts.items():
                    for kind, config in (("plain", plain), ("spec", spec)):
                        runs[task][f"{where_name}_{kind}"] = _timed(client, texts, config)
                        _, seconds, trips = runs[task][f"{where_name}_{kind}"]
                        print(f"{task} {where_name} {kind}: {seconds:.1f} s, {trips} round trips", file=sys.stderr)
    finally:
        stop_server(server)
    totals = {"plain_s": 0.0, "spec_s": 0.0}
    for task, run in runs.items():
        ids, spec_s, trips = run["loopback_spec"]
        plain_ids, plain_s, plain_trips = run["loopback_plain"]
        shaped_plain_s, shaped_spec_s = run["shaped_plain"][1], run["shaped_spec"][1]
        tokens = sum(len(x) for x in ids)
        totals["plain_s"] += plain_s
        totals["spec_s"] += spec_s
        results[task] = {
            "tokens": tokens,
            "plain_round_trips": plain_trips,
            "spec_round_trips": trips,
            "spec_tokens_per_round_trip": round(tokens / trips, 2),
            "plain_tok_s_loopback": round(tokens / plain_s, 2),
            "spec_tok_s_loopback": round(tokens / spec_s, 2),
            "spec_vs_plain_loopback": round(plain_s / spec_s, 3),
            f"plain_tok_s_{latency_ms:g}ms": round(tokens / shaped_plain_s, 2),
            f"spec_tok_s_{latency_ms:g}ms": round(tokens / shaped_spec_s, 2),
            "spec_vs_plain_shaped": round(shaped_plain_s / shaped_spec_s, 3),
            "identical": ids == plain_ids and run["shaped_spec"][0] == plain_ids,
        }
    best = max(SPECULATIVE_TASKS, key=lambda t: results[t]["spec_vs_plain_shaped"])
    results["best_task"] = best
    results["spec_tokens_per_round_trip"] = max(results[t]["spec_tokens_per_round_trip"] for t in SPECULATIVE_TASKS)
    results[f"spec_vs_plain_{latency_ms:g}ms"] = results[best]["spec_vs_plain_shaped"]
    results["spec_vs_plain_loopback"] = round(totals["plain_s"] / totals["spec_s"], 3)
    results["spec_vs_plain_loopback_worst_task"] = min(results[t]["spec_vs_plain_loopback"] for t in SPECULATIVE_TASKS)
    results["identical"] = all(results[t]["identical"] for t in SPECULATIVE_TASKS)
    results["targets"] = {"spec_tokens_per_round_trip": ">= 2", "spec_vs_plain_25ms": ">= 1.8", "loopback": ">= 1"}
    return results
