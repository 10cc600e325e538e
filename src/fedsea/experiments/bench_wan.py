"""``fedsea bench wan``: the ``NetShaper`` against a real delayed TCP link (``DelayProxy``).

Every WAN figure fedsea reports (split generation at 25 ms, the federation modes' speedups)
comes from the shaper, which sleeps per message in the client. This checks it against the
reference, a loopback TCP proxy in a process of its own that delays every byte by the same
one-way latency (``fedsea.wire.delay_proxy``): split generation (ms per token, batch 1) and a
split training step (ms per step), each measured over plain loopback, under the shaper and
through the proxy, alternating the two so that a change of the machine's load hits both.
``shaper_vs_proxy_*`` near 1 is agreement (the issue's bound: within 5%).
"""

from __future__ import annotations

import statistics
import time
from typing import Any


def _time_generation(client: Any, prompt: str, new_tokens: int) -> float:
    """Milliseconds per new token of one greedy generation (every token generated: no EOS)."""
    from fedsea.training.generation_config import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=(-1,))
    start = time.perf_counter()
    client.generate([prompt], config)
    return (time.perf_counter() - start) * 1000 / new_tokens


def _time_step(client: Any, batch: Any) -> float:
    start = time.perf_counter()
    client.train_step(batch)
    return (time.perf_counter() - start) * 1000


def bench_wan(
    model: str = "tiny-llama",
    latency_ms: float = 25.0,
    new_tokens: int = 24,
    batch: int = 4,
    tokens: int = 128,
    repeats: int = 3,
    head_layers: int = 1,
    tail_layers: int = 1,
    train_steps: bool = True,
) -> dict[str, Any]:
    """Shaper against proxy at ``latency_ms`` one way; returns the benchmark's JSON record
    (``train_steps=False``: generation only)."""
    from fedsea.client.split_client import SplitClient
    from fedsea.config import LoraSpec
    from fedsea.model.load import load_model, load_tokenizer
    from fedsea.model.split import split_model
    from fedsea.server.app import ServerThread, TrunkServer
    from fedsea.server.trunk import TrunkHost
    from fedsea.training.batch import make_batch
    from fedsea.wire.delay_proxy import ProxyProcess
    from fedsea.wire.shaper import NetShaper

    tokenizer = load_tokenizer(model)
    text = "The council met on Tuesday to discuss the new park by the river and its opening hours. " * 40
    ids = tokenizer(text)["input_ids"][:tokens]
    prompt = str(tokenizer.decode(ids))
    train = make_batch([ids] * batch, tokenizer.pad_token_id)
    thread = ServerThread(TrunkServer(TrunkHost(load_model(model, "float32", "cpu"))))
    port = thread.start()
    direct = f"127.0.0.1:{port}"

    def connect(address: str, shaper: NetShaper) -> SplitClient:
        split = split_model(load_model(model, "float32", "cpu"), head_layers, tail_layers)
        client = SplitClient(address, split.add_lora(LoraSpec(r=4, dropout=0.0)), tokenizer=tokenizer, shaper=shaper)
        client.connect()
        _time_generation(client, prompt, 2)  # warm: shapes, caches, the connection's windows
        if train_steps:
            _time_step(client, train)
        return client

    hows = ("loopback", "shaper", "proxy")
    runs: dict[str, dict[str, list[float]]] = {k: {"generate": [], "train": []} for k in hows}
    try:
        for _ in range(repeats):
            for how in hows:
                if how == "proxy":
                    with ProxyProcess(direct, latency_ms) as address:
                        client = connect(address, NetShaper())
                        runs[how]["generate"].append(_time_generation(client, prompt, new_tokens))
                        runs[how]["train"].append(_time_step(client, train) if train_steps else float("nan"))
                        client.close()
                    continue
                shaper = NetShaper(latency_ms=latency_ms) if how == "shaper" else NetShaper()
                client = connect(direct, shaper)
                runs[how]["generate"].append(_time_generation(client, prompt, new_tokens))
                runs[how]["train"].append(_time_step(client, train) if train_steps else float("nan"))
                client.close()
    finally:
        thread.stop()
    median = {how: {k: statistics.median(v) for k, v in parts.items()} for how, parts in runs.items()}
    return {
        "benchmark": "wan",
        "model": model,
        "latency_ms": latency_ms,
        "new_tokens": new_tokens,
        "batch": batch,
        "tokens": tokens,
        "repeats": repeats,
        "generate_ms_per_token": median_of(median, "generate"),
        "train_ms_per_step": median_of(median, "train"),
        "shaper_vs_proxy_generate": round(median["shaper"]["generate"] / median["proxy"]["generate"], 4),
        "shaper_vs_proxy_train": round(median["shaper"]["train"] / median["proxy"]["train"], 4),
    }


def median_of(median: dict[str, dict[str, float]], part: str) -> dict[str, float]:
    """``{loopback, shaper, proxy}`` -> the part's median, rounded to 0.1 ms."""
    return {how: round(values[part], 1) for how, values in median.items()}
