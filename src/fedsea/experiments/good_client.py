"""An honest client whose results are checked bit for bit: the reliability benches' yardstick.

``good_run`` trains a fresh tiny split for a few steps through the server and then generates a
few tokens greedily. Every run starts from the same seeded weights and the same batch, so two
runs against a healthy server give identical losses, trunk adapter and tokens; after the
server was fuzzed, flooded or starved, any difference means that one client's abuse leaked
into another's results.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from fedsea.experiments.serve_proc import TINY_MODEL

TEXTS = ["Review: sharp writing and warm performances.", "Dull.", "The council approved a new park."]


@dataclass(frozen=True)
class GoodResult:
    """What must not change: the step losses, a digest of the served trunk adapter, the tokens."""

    losses: tuple[float, ...]
    adapter_sha256: str
    tokens: tuple[tuple[int, ...], ...]
    seconds: float

    def same_as(self, other: GoodResult) -> bool:
        """Bit-exact equality of everything but the timing."""
        return (self.losses, self.adapter_sha256, self.tokens) == (other.losses, other.adapter_sha256, other.tokens)


_CACHE: dict[str, Any] = {}
# Seeding uses torch's global RNG and the fast tokenizer is not safe to share between threads:
# the soak benchmark's client threads build their splits and batches one at a time.
_LOCK = threading.Lock()


def _parts(model: str) -> tuple[Any, Any]:
    from fedsea.model.load import load_model, load_tokenizer

    if model not in _CACHE:
        _CACHE[model] = (load_model(model), load_tokenizer(model))
    return _CACHE[model]  # type: ignore[no-any-return]


def _fresh_split(model: str, seed: int) -> Any:
    """The tiny model split p = 1, q = 1 with seeded LoRA (identical on every call)."""
    import copy

    from fedsea.config import LoraSpec
    from fedsea.model.split import split_model

    base, _ = _parts(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        split = split_model(copy.deepcopy(base), 1, 1).add_lora(LoraSpec(r=4, dropout=0.0))
        # peft starts lora_B at zero; make every adapter non-zero so the trunk's update shows.
        with torch.no_grad():
            for name, param in split.model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn_like(param) * 0.02)
    return split


def good_run(
    address: str,
    steps: int = 2,
    new_tokens: int = 4,
    seed: int = 0,
    timeout_s: float = 60.0,
    model: str = TINY_MODEL,
    token: str | None = None,
) -> GoodResult:
    """Train ``steps`` steps and generate ``new_tokens`` tokens through ``address`` (fresh session).

    Raises:
        fedsea.errors.RemoteError: the server refused or failed a call (an honest client's
            request must always succeed: the callers count this as an error).
    """
    from fedsea.client.deadlines import ClientTimeouts
    from fedsea.client.split_client import SplitClient
    from fedsea.config import OptimConfig
    from fedsea.training import make_batch

    with _LOCK:
        _, tokenizer = _parts(model)
        split = _fresh_split(model, seed)
        batch = make_batch([tokenizer(t)["input_ids"] for t in TEXTS], tokenizer.pad_token_id)
    start = time.perf_counter()
    each = {f"{kind}_timeout_s": timeout_s for kind in ("call", "step", "decode", "adapter", "round")}
    timeouts = ClientTimeouts(**each, reconnect_timeout_s=0.0)  # a lost server is an error here
    with SplitClient(
        address, split, optim=OptimConfig(lr=1e-2), timeouts=timeouts, retries=0, token=token, seed=seed
    ) as client:
        losses = tuple(float(client.train_step(batch).loss) for _ in range(steps))
        state = client.trunk_adapter()
        ids = batch.input_ids[:2]
        out = client.generate_ids(ids, batch.lengths[:2], max_new_tokens=new_tokens)
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    tokens = tuple(tuple(int(t) for t in row) for row in out.token_ids)
    return GoodResult(losses, digest.hexdigest(), tokens, time.perf_counter() - start)
