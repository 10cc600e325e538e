"""A multi-tenant trunk over loopback gRPC (issue 17, item 2): 16 concurrent generation sessions of
4 clients, each session with its own random trunk adapter and prompt lengths, are joined into
shared trunk passes, and every session generates exactly the tokens it generates alone."""

from __future__ import annotations

import threading

import torch

import fedsea
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.trunk import TrunkHost
from fedsea.wire.auth import TokenStore
from tests.conftest import randomize_lora
from tests.integration.conftest import TINY

CLIENTS, SESSIONS_EACH, NEW_TOKENS = 4, 4, 12


def _session_split(index: int) -> fedsea.SplitModel:
    """Session ``index``'s model: LoRA of its own everywhere (the trunk's goes to the server), B non-zero.
    The last client cuts the model elsewhere: its sessions' trunks are other blocks (passes of their own)."""
    head = 1 if index // SESSIONS_EACH == CLIENTS - 1 else 2
    split = fedsea.split_model(fedsea.tiny_llama(**TINY), head, 2).add_lora(fedsea.LoraSpec(r=4, dropout=0.0))
    randomize_lora(split.model, seed=1000 + index, scale=0.2)
    return split


def _prompt(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Session ``index``'s prompts: one or two rows (left-padded) of 3 to 33 tokens."""
    gen = torch.Generator().manual_seed(index)
    rows = 1 + index % 2
    lengths = torch.tensor([3 + (2 * index + 5 * r) % 31 for r in range(rows)])
    width = int(lengths.max())
    ids = torch.randint(3, TINY["vocab_size"], (rows, width), generator=gen)
    for r, n in enumerate(lengths.tolist()):
        ids[r, : width - n] = 0  # padding
    return ids, lengths


def test_sixteen_sessions_with_their_own_adapters_share_passes_and_generate_as_alone():
    store = TokenStore()
    tokens = [store.add(f"tenant-{c}") for c in range(CLIENTS)]
    host = TrunkHost(fedsea.tiny_llama(**TINY))
    server = TrunkServer(host, tokens=store)
    thread = ServerThread(server)
    address = f"localhost:{thread.start()}"
    count = CLIENTS * SESSIONS_EACH
    clients = [
        fedsea.SplitClient(address, _session_split(i), token=tokens[i // SESSIONS_EACH]).connect() for i in range(count)
    ]
    try:
        prompts = [_prompt(i) for i in range(count)]

        def run(i: int) -> list[list[int]]:
            ids, lengths = prompts[i]
            return clients[i].generate_ids(ids, lengths, max_new_tokens=NEW_TOKENS, eos_token_id=()).token_ids

        scheduler = server.servicer.scheduler
        alone = [run(i) for i in range(count)]  # one stream at a time: the single-session path
        assert scheduler.stats.joint_passes == 0
        # The adapters matter: sessions given the same prompt generate differently.
        assert len({tuple(alone[i][0]) for i in range(count)}) > count // 2

        together: list[list[list[int]] | None] = [None] * count
        errors: list[BaseException] = []
        start = threading.Barrier(count)

        def worker(i: int) -> None:
            try:
                start.wait()
                together[i] = run(i)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        for i in range(count):
            assert together[i] == alone[i], f"session {i} generated other tokens when joined"
        stats = scheduler.stats
        # The server did join them: passes of several streams, which computed most of the steps.
        assert stats.joint_passes > 0 and stats.max_streams >= 4, stats
        steps = count * (NEW_TOKENS - 1)  # one trunk call per new token but the last
        assert stats.joint_steps > steps // 2, stats
        assert host.model.config._attn_implementation == "sdpa"
        # Every stream's cache was freed when it closed; nothing stays reserved.
        assert server.servicer.generation.count() == 0 and server.servicer.generation.reserved_bytes() == 0
    finally:
        for client in clients:
            client.close()
        thread.stop()
