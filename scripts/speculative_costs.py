"""What bounds split speculative decoding on a CPU: a step's cost by tokens, and prompt lookup's reach.

Two measurements behind BENCHMARKS.md's "Issue 17: where the speculative targets stand":

``step-cost``: one split decode step in process (head, trunk through a ``LocalStepper``, tail and
LM head; no wire) after a 256-token prefill, timed with 1, 2, ... tokens per step (a
verification step carries the last token and m drafts). On a GPU a step of a few tokens costs
about what one costs; on a CPU it does not, and that decides when a round trip saved pays.

``lookup``: SmolLM2's greedy answers (Hugging Face ``generate``, the split's output by
exactness) to the first N prompts of each task of ``fedsea bench generate --speculative``,
then prompt lookup replayed on them offline: the drafter fedsea ships (one chain: the longest
continuation of the latest match) against a tree of every match's continuation (what tree
verification, as in SpecInfer or Medusa, would check in one pass). Tokens per round trip count
the prefill's round trip, as the benchmark does.

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/speculative_costs.py step-cost \
        --out docs/speculative/step-cost.json
    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/speculative_costs.py lookup --prompts 10 \
        --out docs/speculative/lookup.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedsea.client.prompts import encode_prompts
from fedsea.experiments.bench_speculative import SPECULATIVE_TASKS, _prompts
from fedsea.model.constants import DEFAULT_MODEL
from fedsea.model.load import load_model, load_tokenizer
from fedsea.model.split import SplitModel, split_model
from fedsea.training.decoder import SplitDecoder
from fedsea.training.drafters import PromptLookupDrafter
from fedsea.training.stepper import LocalStepper


def _timer(totals: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        return out

    return timed


@torch.no_grad()
def step_cost(split: SplitModel, drafts: list[int], prompt: int, repeats: int) -> list[dict[str, float]]:
    """Median ms of one step carrying 1 + m tokens, per part, for each m in ``drafts``."""
    totals: dict[str, float] = {}
    # Wrapped once: the parts are shared by every decoder below.
    split.head.forward = _timer(totals, "head", split.head.forward)  # type: ignore[method-assign]
    split.tail.forward = _timer(totals, "tail", split.tail.forward)  # type: ignore[method-assign]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (1, prompt), generator=generator)  # (1, prompt)
    rows = []
    for m in drafts:
        stepper = LocalStepper(split.trunk)
        stepper.step = _timer(totals, "trunk", stepper.step)  # type: ignore[method-assign]
        decoder = SplitDecoder(split, stepper, ids, torch.tensor([prompt]))
        decoder.logits()  # the prefill
        samples = []
        for i in range(repeats + 2):  # two warm-up steps
            totals.clear()
            decoder.feed(torch.randint(100, 40000, (1, m + 1), generator=generator))
            start = time.perf_counter()
            decoder.logits(keep=m + 1).argmax(dim=-1).tolist()  # (1, m + 1): every position checked
            total = time.perf_counter() - start
            if m:  # back to the prefill's length plus one token: every step sees the same cache
                decoder.rewind(decoder.length - m)
            if i >= 2:
                samples.append({"total": total, **totals})
        row = {"tokens_per_step": m + 1}
        row |= {f"{k}_ms": round(1e3 * statistics.median(s[k] for s in samples), 1) for k in samples[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _chains(ids: list[int], ngram: int, least: int, k: int, every: bool) -> list[list[int]]:
    """Prompt lookup's drafts after ``ids``: fedsea's one chain, or (``every``) each match's continuation."""
    if not every:
        tokens = PromptLookupDrafter(ngram, least).propose(ids, k, lambda _p, s: s, None).tokens
        return [tokens] if tokens else []
    for n in range(min(ngram, len(ids) - 1), least - 1, -1):
        tail = ids[-n:]
        limit = k if n == ngram else min(k, n)  # as the shipped drafter: a short match proposes at most n
        found = [ids[h + n : h + n + limit] for h in range(len(ids) - n) if ids[h : h + n] == tail]
        found = [c for c in found if c]
        if found:
            return found
    return []


def _tree_nodes(chains: list[list[int]]) -> int:
    """Nodes of the trie of ``chains``: the draft positions a tree verification step carries."""
    return len({tuple(c[: i + 1]) for c in chains for i in range(len(c))})


def replay(
    answers: list[dict[str, list[int]]], ngram: int, least: int, k: int, tree: bool, cost: Callable[[int], float]
) -> dict[str, float]:
    """Prompt lookup replayed on greedy answers with transformers' draft-length schedule.

    ``cost(n)``: seconds of a step carrying n tokens, the round trip included; the predicted
    speed-up is plain generation's time (one-token steps) over this replay's.
    """
    tokens = trips = nodes = 0
    seconds = plain = 0.0
    for answer in answers:
        ids, gen = list(answer["prompt"]), answer["answer"]
        ids.append(gen[0])  # the prefill's round trip gives the first token
        pos, trips, width = 1, trips + 1, k
        plain += (len(gen) - 1) * cost(1)
        while pos < len(gen):
            room = min(width, len(gen) - pos - 1)
            chains = _chains(ids, ngram, least, room, tree) if room > 0 else []
            kept = 0
            for chain in chains:
                hit = 0
                while hit < len(chain) and chain[hit] == gen[pos + hit]:
                    hit += 1
                kept = max(kept, hit)
            drafted = max((len(c) for c in chains), default=0)
            if drafted:  # +2 when every draft is kept, else -1 (speculative.py's rule)
                width = min(k, width + 2) if kept == drafted else max(1, width - 1)
            nodes += _tree_nodes(chains)
            seconds += cost(1 + _tree_nodes(chains))
            ids += gen[pos : pos + kept + 1]
            pos, trips = pos + kept + 1, trips + 1
        tokens += len(gen)
    verify_steps = trips - len(answers)
    return {"tokens_per_round_trip": round(tokens / trips, 3), "drafts_per_step": round(nodes / verify_steps, 2),
            "predicted_speedup": round(plain / seconds, 3)}  # fmt: skip


def step_costs(path: Path, wire_ms: float, rtt_ms: float) -> Callable[[int], float]:
    """``cost(n)`` from a ``step-cost`` record: the measured step nearest in size, plus wire and round trip."""
    measured = {row["tokens_per_step"]: row["total_ms"] for row in json.loads(path.read_text())["steps"]}

    def cost(n: int) -> float:
        nearest = min(measured, key=lambda m: (abs(m - n), -m))
        return (measured[nearest] + wire_ms + rtt_ms) / 1e3

    return cost


def lookup(
    model: Any, tokenizer: Any, split: SplitModel, prompts: int, new_tokens: int, costs: Path, wire_ms: float
) -> dict[str, Any]:
    """Greedy answers per task, then chain and tree prompt lookup replayed on them."""
    out: dict[str, Any] = {}
    for task in SPECULATIVE_TASKS:
        answers = []
        for text in _prompts(task, prompts, tokenizer, 256, None):
            ids, _ = encode_prompts(tokenizer, split, text, None)  # (1, n), no padding
            done = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  do_sample=False, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
            answers.append({"prompt": ids[0].tolist(), "answer": done[0, ids.shape[1] :].tolist()})
        rows = []
        for least in (1, 2, 3):
            for k in (6, 10):
                for tree in (False, True):
                    drafts = "tree" if tree else "chain"
                    row: dict[str, Any] = {"ngram": 3, "min_ngram": least, "k": k, "drafts": drafts}
                    for rtt in (0, 50):  # loopback, and 25 ms one-way
                        got = replay(answers, 3, least, k, tree, step_costs(costs, wire_ms, rtt))
                        row |= {key: value for key, value in got.items() if key != "predicted_speedup"}
                        row[f"predicted_speedup_rtt_{rtt}ms"] = got["predicted_speedup"]
                    rows.append(row)
                    print(task, json.dumps(row), flush=True)
        out[task] = {"answers": len(answers), "tokens": sum(len(a["answer"]) for a in answers), "replays": rows}
    return out


def main() -> None:
    """Parse the command line, measure, print JSON lines and write the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("step-cost", "lookup"))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--head-layers", type=int, default=2)
    parser.add_argument("--tail-layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=10, help="lookup: prompts per task")
    parser.add_argument("--new-tokens", type=int, default=48, help="lookup: at most this many per answer")
    parser.add_argument("--repeats", type=int, default=16, help="step-cost: timed steps per size")
    parser.add_argument("--step-cost", type=Path, default=Path("docs/speculative/step-cost.json"),
                        help="lookup: a step-cost record, for the predicted speed-ups")  # fmt: skip
    parser.add_argument("--wire-ms", type=float, default=15.0,
                        help="lookup: a round trip's cost beyond the compute on loopback (gRPC, codec)")  # fmt: skip
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, torch.float32, "cpu")
    split = split_model(model, args.head_layers, args.tail_layers)
    record: dict[str, Any] = {"model": args.model, "head_layers": args.head_layers, "tail_layers": args.tail_layers,
                              "threads": 1, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    if args.what == "step-cost":
        record["prompt_tokens"] = 256
        record["steps"] = step_cost(split, [0, 1, 2, 3, 4, 6, 8, 10], 256, args.repeats)
    else:
        record["new_tokens"] = args.new_tokens
        record |= {"step_cost": str(args.step_cost), "wire_ms": args.wire_ms}
        record |= lookup(model, tokenizer, split, args.prompts, args.new_tokens, args.step_cost, args.wire_ms)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
